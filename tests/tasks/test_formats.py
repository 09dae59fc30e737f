"""Flan (zero/few-shot, CoT), Alpaca instruction and ChatGLM3 chat formats."""

import functools
import json
import re

import numpy as np
import pytest
import seqio

from glmjax.tasks import formats, registry, sources, synthetic, vocab
from tests.tasks import reference

IDS = vocab.special_ids()
V = vocab.default_vocabulary()


def qa_records(count, offset=0):
  return [{"id": offset + i, "question": f"What is item {offset + i}?",
           "options": "" if i % 2 else f"{i}\n{i + 1}\n{i + 2}", "answer": str(i),
           "rationale": f"Item {offset + i} is {i}."} for i in range(count)]


def run_flan(records, fmt, pool=None, seed=1, **kwargs):
  source = sources.records_source(lambda split: records, ["train"], formats.QA_FIELDS)
  prep = functools.partial(formats.flan, sequence_length={"tokens": 512}, output_features=None, format=fmt,
                           exemplars=(lambda: pool) if pool is not None else None, **kwargs)
  with seqio.map_seed_manager(seed):
    return list(prep(source.get_dataset("train", shuffle=False)).as_numpy_iterator())


def text(example, key):
  return example[key].decode("utf-8")


def prompt_and_answer(example):
  """(Part A text without [gMASK], Part B answer text), checking the text-to-text layout."""
  part_a, spans = reference.split_parts(example, IDS.sop)
  assert part_a[-1] == IDS.gmask and len(spans) == 1
  _, tokens, targets, _, blocks = spans[0]
  assert tokens[0] == IDS.sop and targets[-1] == IDS.eop
  np.testing.assert_array_equal(tokens[1:], targets[:-1])
  np.testing.assert_array_equal(blocks, np.arange(1, len(tokens) + 1))
  return V.decode(part_a[:-1].tolist()), V.decode(spans[0][2][:-1].tolist())


@pytest.mark.parametrize("fmt", formats.FLAN_FORMATS)
def test_flan_formats_render_prompt_as_part_a_and_answer_as_part_b(fmt):
  records = qa_records(12)
  examples = run_flan(records, fmt, pool=qa_records(12), num_exemplars=2)
  templates = formats.DEFAULT_TEMPLATES[fmt]
  used_templates = set()
  for record, example in zip(records, examples):
    prompt, answer = prompt_and_answer(example)
    assert prompt == text(example, "inputs_pretokenized")
    assert answer == text(example, "targets_pretokenized")
    assert record["question"] in prompt.split(formats.EXEMPLAR_SEPARATOR)[-1]
    if record["options"]:
      assert "OPTIONS:\n- " + record["options"].replace("\n", "\n- ") in prompt
    if fmt in ("cot", "few_shot_cot"):
      assert answer == f"{record['rationale']} The answer is {record['answer']}."
      assert "step by step" in prompt.split(formats.EXEMPLAR_SEPARATOR)[-1]
    else:
      assert answer == record["answer"]
    last = prompt.split(formats.EXEMPLAR_SEPARATOR)[-1]
    used_templates |= {i for i, (p, _) in enumerate(templates) if p.split("{")[0] and last.startswith(p.split("{")[0])}
    # positions / blocks / loss as the spec
    b = example["bidirectional"] == 0
    np.testing.assert_array_equal(example["positions"][b], int(example["bidirectional"].sum()) - 1)
    np.testing.assert_array_equal(example["loss_mask"], b.astype(np.int32))
  assert len(used_templates) >= 2, "templates are drawn per example"


@pytest.mark.parametrize("fmt", ["few_shot", "few_shot_cot"])
def test_few_shot_exemplars_never_include_the_asked_example(fmt):
  records = qa_records(6)  # a small pool makes a self-exemplar likely if exclusion were broken
  for seed in range(4):
    for record, example in zip(records, run_flan(records, fmt, pool=records, seed=seed, num_exemplars=3)):
      blocks = text(example, "inputs_pretokenized").split(formats.EXEMPLAR_SEPARATOR)
      assert len(blocks) == 4
      asked = [r["id"] for r in records if r["question"] in blocks[-1]]
      shots = [r["id"] for r in records for b in blocks[:-1] if r["question"] in b]
      assert asked == [record["id"]] and len(shots) == 3 == len(set(shots))
      assert record["id"] not in shots


def test_few_shot_choice_is_deterministic_from_the_seed():
  records = qa_records(10)
  first, again, other = (run_flan(records, "few_shot", pool=records, seed=s) for s in (5, 5, 6))
  assert [text(e, "inputs_pretokenized") for e in first] == [text(e, "inputs_pretokenized") for e in again]
  assert [text(e, "inputs_pretokenized") for e in first] != [text(e, "inputs_pretokenized") for e in other]


def test_flan_errors_name_the_problem():
  with pytest.raises(ValueError, match="format="):
    run_flan(qa_records(4), "one_shot")
  with pytest.raises(ValueError, match="exemplars="):
    run_flan(qa_records(4), "few_shot")
  with pytest.raises(ValueError, match="unknown field"):
    run_flan(qa_records(4), "zero_shot", templates=[("{question} {query}", "{answer}")])


def test_long_prompts_lose_their_left_end():
  records = [{"id": 0, "question": "word " * 400 + "FINAL QUESTION?", "options": "", "answer": "yes",
              "rationale": ""}]
  source = sources.records_source(lambda split: records, ["train"], formats.QA_FIELDS)
  with seqio.map_seed_manager(0):
    example = next(formats.flan(source.get_dataset("train", shuffle=False), {"tokens": 64}, None,
                                format="zero_shot").as_numpy_iterator())
  assert len(example["tokens"]) == 64
  prompt, answer = prompt_and_answer(example)
  assert "FINAL QUESTION?" in prompt and answer.strip() == "yes"


def test_alpaca_jsonl_instruction_task(tmp_path):
  rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
          {"instruction": "Say hi.", "input": "", "output": "hi"}]
  path = tmp_path / "alpaca.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
  task = registry.register_instruction_task("test_formats_alpaca", {"train": str(path)})
  try:
    examples = list(task.get_dataset({"tokens": 128}, split="train", shuffle=False).as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove("test_formats_alpaca")
  prompts = [prompt_and_answer(e) for e in examples]
  assert prompts == [("Translate to French.\n\ncat", "chat"), ("Say hi.", "hi")]


def test_chat_loss_only_on_assistant_turns():
  conversation = {"roles": ["system", "user", "assistant", "observation", "assistant", "user", "assistant"],
                  "contents": ["Be brief.", "What is 2 + 3?", "Calling the calculator.", "5",
                               "It is 5.", "And 4 + 4?", "8"]}
  source = sources.records_source(lambda split: [conversation], ["train"], ["roles", "contents"])
  example = next(formats.chat(source.get_dataset("train", shuffle=False)).as_numpy_iterator())
  # Reference, written out turn by turn with the Python tokenizer.
  stream, assistant = [IDS.sop], [False]
  for role, content in zip(conversation["roles"], conversation["contents"]):
    ids = V.tokenizer.encode(content)
    stream += [IDS.role(role), IDS.newline] + ids
    assistant += [False, False] + [role == "assistant"] * len(ids)
  stream.append(IDS.eop)
  assistant.append(False)
  expected_loss = [0] + [int(assistant[i + 1] or (assistant[i] and not assistant[i + 1]))
                         for i in range(len(stream) - 1)]
  np.testing.assert_array_equal(example["tokens"], [IDS.gmask] + stream[:-1])
  np.testing.assert_array_equal(example["targets"], [0] + stream[1:])
  np.testing.assert_array_equal(example["loss_mask"], expected_loss)
  np.testing.assert_array_equal(example["bidirectional"], [1] + [0] * (len(stream) - 1))
  np.testing.assert_array_equal(example["block_positions"], np.arange(len(stream)))
  learned = V.decode([t for t, m in zip(example["targets"], example["loss_mask"]) if m])
  assert learned == "Calling the calculator.<|observation|> It is 5.<|user|> 8<eop>"


def test_chat_jsonl_rejects_unknown_roles(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"conversations": [{"role": "bot", "content": "hi"}]}), encoding="utf-8")
  with pytest.raises(ValueError, match="role 'bot'"):
    registry.chat_jsonl_records(str(path))


def test_synthetic_arithmetic_answers_are_correct():
  checked = 0
  for record in synthetic.problems("validation", 60):
    assert record["answer"].isdigit() and record["answer"] in record["rationale"]
    heads_legs = re.search(r"(\d+) heads and (\d+) legs", record["question"])
    heads_legs_zh = re.search(r"上有(\d+)个头，下有(\d+)只脚", record["question"])
    if heads_legs or heads_legs_zh:  # solve the two equations independently
      heads, legs = map(int, (heads_legs or heads_legs_zh).groups())
      rabbits = (legs - 2 * heads) // 2
      assert int(record["answer"]) == (rabbits if heads_legs else heads - rabbits)
      checked += 1
    if record["options"]:
      assert record["answer"] in record["options"].split("\n") and len(record["options"].split("\n")) == 4
  assert checked >= 15
  train_ids = {r["id"] for r in synthetic.problems("train")}
  assert not train_ids & {r["id"] for r in synthetic.problems("validation")}
  assert synthetic.problems("train", 5) == synthetic.problems("train", 5)
