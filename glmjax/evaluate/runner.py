"""Evaluating registered seqio tasks (glmjax.tasks) the way they were trained.

The kind of evaluation follows from a task's examples:

* language modelling (no `answer` feature: blank infilling, causal LM) --
  teacher-forced NLL, perplexity and token accuracy on the split's Part B
  targets, next to a unigram baseline whose token frequencies come from the
  train split (add-one smoothed; its accuracy always predicts the most
  frequent token); also the entropy of the evaluated targets themselves
  (`unigram_oracle_nll`, the best any unigram model could do on them);
* multiple choice (the prompt lists "OPTIONS:\\n- a\\n- b"): each option is
  filled into the prompt's [gMASK] and scored by its summed (optionally
  length-normalised) log-probability; accuracy against `answer`;
* chain of thought (targets end "The answer is X."): greedy generation, the
  answer extracted, accuracy against `answer`;
* other generated answers: greedy generation, normalised exact match.

Mixtures are expanded into their tasks; results are per task plus the mean
of every metric over the tasks that report it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Sequence

import numpy as np

from glmjax.evaluate import metrics as metrics_lib
from glmjax.evaluate import scoring
from glmjax.generate import glm
from glmjax.generate.decoding import GenerationOptions

_OPTIONS_BLOCK = re.compile(r"OPTIONS:\n((?:- [^\n]*(?:\n|$))+)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  split: str = "validation"
  sequence_length: int = 0  # 0: the model's max_length
  batch_size: int = 8
  max_examples: int = 0  # QA tasks; 0: the whole split
  lm_batches: int = 0  # LM tasks; 0: the whole split
  unigram_batches: int = 200  # train-split batches counted for the unigram baseline
  length_normalize: bool = False
  score_eop: bool = False
  generation: GenerationOptions = GenerationOptions(max_new_tokens=64)


def expand_tasks(names: Sequence[str]) -> list[str]:
  """Task names, mixtures replaced by their tasks (recursively), duplicates dropped."""
  import seqio  # pylint: disable=import-outside-toplevel
  out = []

  def visit(name):
    if name in seqio.MixtureRegistry.names():
      for task in seqio.get_mixture_or_task(name).tasks:
        visit(task.name)
    elif name in seqio.TaskRegistry.names():
      out.append(name)
    else:
      raise ValueError(f"--tasks: {name!r} is not a registered seqio task or mixture; register it "
                       "in a module passed with --module")

  for name in names:
    visit(name)
  return list(dict.fromkeys(out))


def parse_options(prompt: str) -> list[str]:
  """Options of the last "OPTIONS:" block of a Flan prompt (glmjax.tasks.formats)."""
  blocks = _OPTIONS_BLOCK.findall(prompt)
  if not blocks:
    return []
  return [line[2:] for line in blocks[-1].split("\n") if line.startswith("- ")]


def _row_length(generator, config: EvalConfig) -> int:
  return config.sequence_length or generator.config.max_length


def _task(name):
  import seqio  # pylint: disable=import-outside-toplevel
  return seqio.get_mixture_or_task(name)


def _has_answers(name: str, split: str) -> bool:
  """Whether the task's examples carry an `answer` (Flan formats) -- from the element spec."""
  from glmjax.tasks import GLMFeatureConverter  # pylint: disable=import-outside-toplevel
  ds = _task(name).get_dataset(GLMFeatureConverter.task_feature_lengths(64), split=split,
                               shuffle=False, num_epochs=1, trim_output_features=False)
  return "answer" in ds.element_spec


# --- Language modelling ------------------------------------------------------------------------

def _lm_batches(generator, name, split, config: EvalConfig, limit: int):
  from glmjax.tasks import get_dataset  # pylint: disable=import-outside-toplevel
  ds = get_dataset(name, sequence_length=_row_length(generator, config), batch_size=config.batch_size,
                   split=split, shuffle=False, num_epochs=1,
                   bidirectional_inputs=generator.convention.bidirectional_inputs,
                   positions_1d=generator.convention.positions_1d)
  if limit:
    ds = ds.take(limit)
  return ds.as_numpy_iterator()


def unigram_counts(generator, name: str, config: EvalConfig) -> np.ndarray:
  counts = np.zeros(generator.config.vocab_size, np.float64)
  for batch in _lm_batches(generator, name, "train", config, config.unigram_batches):
    mask = batch["loss_mask"] > 0
    np.add.at(counts, batch["targets"][mask], 1.0)
  return counts


def evaluate_lm_task(generator, name: str, config: EvalConfig) -> dict:
  counts = unigram_counts(generator, name, config)
  logp_unigram = np.log((counts + 1.0) / (counts.sum() + counts.size))
  most_frequent = int(np.argmax(counts))
  totals = scoring.LMTotals()
  evaluated = np.zeros_like(counts)
  with generator.sharding_context():
    for batch in _lm_batches(generator, name, config.split, config, config.lm_batches):
      totals.add(generator.params, generator.config, batch)
      mask = batch["loss_mask"] > 0
      np.add.at(evaluated, batch["targets"][mask], 1.0)
  result = {"kind": "language_model", **totals.metrics()}
  n = max(evaluated.sum(), 1.0)
  unigram_nll = -float(evaluated @ logp_unigram) / n
  seen = evaluated > 0
  oracle_nll = -float(evaluated[seen] @ np.log(evaluated[seen] / n)) / n
  result.update(unigram_nll=unigram_nll, unigram_perplexity=math.exp(unigram_nll),
                unigram_accuracy=float(evaluated[most_frequent]) / n,
                unigram_oracle_nll=oracle_nll)
  return result


# --- Question answering ------------------------------------------------------------------------

@dataclasses.dataclass
class QAExample:
  part_a: list  # prompt + [gMASK]
  prompt: str
  target: str
  answer: str
  options: list


def qa_examples(generator, name: str, config: EvalConfig) -> list[QAExample]:
  from glmjax.tasks import GLMFeatureConverter  # pylint: disable=import-outside-toplevel
  lengths = GLMFeatureConverter.task_feature_lengths(_row_length(generator, config))
  ds = _task(name).get_dataset(lengths, split=config.split, shuffle=False, num_epochs=1,
                               trim_output_features=False)
  if config.max_examples:
    ds = ds.take(config.max_examples)
  out = []
  for ex in ds.as_numpy_iterator():
    prompt = ex["inputs_pretokenized"].decode()
    part_a = [int(t) for t, bidi in zip(ex["tokens"], ex["bidirectional"]) if bidi]
    out.append(QAExample(part_a=part_a, prompt=prompt, target=ex["targets_pretokenized"].decode(),
                         answer=ex["answer"].decode(), options=parse_options(prompt)))
  return out


def _fit(part_a: list, room: int) -> list:
  """Keeps the last `room` tokens of Part A (its [gMASK] is last; Flan prompts end with the question)."""
  return part_a[max(0, len(part_a) - room):]


def _chunks(items: list, size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def evaluate_multiple_choice(generator, examples: list[QAExample], config: EvalConfig) -> dict:
  specials = scoring.Specials.from_ids(generator.ids)
  length = _row_length(generator, config)
  hits = []
  with generator.sharding_context():
    for chunk in _chunks(examples, config.batch_size):
      options = [[generator.encode(o) for o in ex.options] for ex in chunk]
      contexts = [_fit(ex.part_a, length - max(map(len, opts)) - int(config.score_eop))
                  for ex, opts in zip(chunk, options)]
      choices = scoring.multiple_choice(
          generator.params, generator.config, contexts, options, mode="blank", specials=specials,
          convention=generator.convention, length_normalize=config.length_normalize,
          score_eop=config.score_eop, batch_size=config.batch_size * 4)
      hits += [ex.options[c.best] == ex.answer for ex, c in zip(chunk, choices)]
  return {"kind": "multiple_choice", "accuracy": metrics_lib.mean(hits), "examples": len(hits)}


def evaluate_generation(generator, examples: list[QAExample], config: EvalConfig, cot: bool) -> dict:
  ids = generator.ids
  options = dataclasses.replace(config.generation, stop_ids=tuple(dict.fromkeys(
      (ids.eop, ids.eos) + config.generation.stop_ids)))
  room = _row_length(generator, config) - 1 - options.max_new_tokens
  if room < 2:
    raise ValueError(f"max_new_tokens={options.max_new_tokens} leaves no room for the prompt in "
                     f"rows of {_row_length(generator, config)} tokens; lower it")
  hits, stated, samples = [], [], []
  for chunk in _chunks(examples, config.batch_size):
    part_as = [_fit(ex.part_a, room) for ex in chunk]
    with generator.sharding_context():
      result = glm.continue_glm(generator.params, generator.config, generator.pad_batch(part_as),
                                generator.pad_batch([[ids.sop]] * len(chunk)),
                                generator.pad_batch([len(a) - 1 for a in part_as]), options,
                                convention=generator.convention)
    for ex, seq in zip(chunk, result.sequences()):
      text = generator.decode(seq)
      if cot:
        answer = metrics_lib.extract_cot_answer(text)
        stated.append(answer is not None)
        hits.append(answer is not None and metrics_lib.exact_match(answer, ex.answer))
      else:
        hits.append(metrics_lib.exact_match(metrics_lib.first_line(text), ex.answer))
      if len(samples) < 3:
        samples.append({"prompt": ex.prompt[-200:], "generated": text, "answer": ex.answer})
  out = {"kind": "chain_of_thought" if cot else "generation",
         ("accuracy" if cot else "exact_match"): metrics_lib.mean(hits), "examples": len(hits)}
  if cot:
    out["answer_stated"] = metrics_lib.mean(stated)
  out["samples"] = samples
  return out


def evaluate_qa_task(generator, name: str, config: EvalConfig) -> dict:
  examples = qa_examples(generator, name, config)
  if not examples:
    raise ValueError(f"task {name!r} split {config.split!r} has no examples")
  if all(ex.options for ex in examples):
    return evaluate_multiple_choice(generator, examples, config)
  cot = all("the answer is" in ex.target.lower() for ex in examples)
  return evaluate_generation(generator, examples, config, cot)


# --- Runs --------------------------------------------------------------------------------------

def evaluate_task(generator, name: str, config: EvalConfig) -> dict:
  if _has_answers(name, config.split):
    return evaluate_qa_task(generator, name, config)
  return evaluate_lm_task(generator, name, config)


def average(per_task: dict) -> dict:
  """Mean of each numeric metric over the tasks reporting it (counts excluded)."""
  sums: dict = {}
  for result in per_task.values():
    for key, value in result.items():
      if isinstance(value, (int, float)) and key not in ("examples", "tokens"):
        sums.setdefault(key, []).append(float(value))
  return {k: metrics_lib.mean(v) for k, v in sums.items()}


def evaluate(generator, task_names: Sequence[str], config: EvalConfig = EvalConfig(),
             log=None) -> dict:
  per_task = {}
  for name in expand_tasks(task_names):
    per_task[name] = evaluate_task(generator, name, config)
    if log is not None:
      log(f"{name}: {_summary(per_task[name])}")
  return {"split": config.split, "tasks": per_task, "average": average(per_task)}


def evaluate_reward(params, model_config, task_names: Sequence[str], *, split: str, sequence_length: int,
                    pairs_per_batch: int, style: str, max_pairs: int = 0, log=None) -> dict:
  """A reward model ({"model", "head"} params, glmjax.tuning.reward) on preference tasks: per task
  the share of `split`'s pairs with r(chosen) > r(rejected) (`pairwise_accuracy`, ties wrong), the
  mean margin and Bradley-Terry loss; same layout as `evaluate` (tasks, average)."""
  from glmjax.tuning import reward  # pylint: disable=import-outside-toplevel
  per_task = {}
  for name in task_names:
    per_task[name] = reward.eval_record(params, model_config, name, split, sequence_length=sequence_length,
                                        pairs_per_batch=pairs_per_batch, style=style, max_pairs=max_pairs)
    if log is not None:
      log(f"{name}: {_summary(per_task[name])}")
  average_of = {n: {k: v for k, v in r.items() if k not in ("pairs", "ties", "dropped", "truncated")}
                for n, r in per_task.items()}
  return {"split": split, "tasks": per_task, "average": average(average_of)}


def _summary(result: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))


TABLE_METRICS = ("accuracy", "exact_match", "nll", "perplexity", "unigram_nll", "unigram_oracle_nll",
                 "unigram_accuracy", "answer_stated", "pairwise_accuracy", "mean_margin", "bt_loss")


def format_table(results: dict) -> str:
  """A fixed-width table: one row per task plus the average."""
  rows = dict(results["tasks"])
  rows["average"] = results["average"]
  columns = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
  width = max(len(n) for n in rows) + 2
  lines = ["task".ljust(width) + "".join(c.rjust(max(len(c), 8) + 2) for c in columns)]
  for name, result in rows.items():
    cells = []
    for c in columns:
      v = result.get(c)
      cells.append(("-" if v is None else f"{v:.4f}").rjust(max(len(c), 8) + 2))
    lines.append(name.ljust(width) + "".join(cells))
  return "\n".join(lines)


def write_json(results: dict, path: str) -> None:
  """Written under a temporary name and renamed: an earlier results file is never half-replaced."""
  from glmjax.run.directory import atomic_write_text  # pylint: disable=import-outside-toplevel
  atomic_write_text(path, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
