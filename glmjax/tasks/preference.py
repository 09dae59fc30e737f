"""Preference pairs (prompt, chosen, rejected) as seqio tasks, batched for DPO / reward models.

    name = register_preference_task("my_prefs", records_fn)
    for batch in pair_batches(name, "train", pairs=8, sequence_length=128, style="chatglm3"):
      ...  # rows 2i (chosen) and 2i + 1 (rejected) of the same pair

The task tokenizes the three texts (features `prompt`, `chosen`, `rejected`); `pair_batches`
lays each pair out as two adjacent rows of one batch, the same prompt in both (glmjax.tuning.dpo's
layout), one sequence per row (no packing across pairs, so a sequence's log-prob is its row's):

  style "instruction": prompt "\\n" response eos                         (plain instruction format)
  style "chatglm3":    [gMASK] <sop> <|user|> "\\n" prompt <|assistant|> "\\n" response <eop>
                       (ChatGLM3's chat template; ChatGLM2/3 are causal with 1-D positions)

`loss_mask` is 1 on the predictions of the response tokens and of its end token only. A pair whose
prompt leaves no room for a response token in `sequence_length` is dropped (counted in
`PairStats`); a long response is cut at the end.

`corpus_preference_records` is a toy preference set built from the embedded Shakespeare corpus
(no preference data ships with a registry package glmjax depends on): the prompt is a passage's
opening, chosen its true continuation, rejected the same words in reverse order: a set a model can
learn to rank, not human preferences.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np
import seqio
import tensorflow as tf

from glmjax.tasks import corpus
from glmjax.tasks import vocab as vocab_lib

FIELDS = ("prompt", "chosen", "rejected")
STYLES = ("instruction", "chatglm3")


def corpus_preference_records(split: str, prompt_words: int = 12, response_words: int = 10) -> list[dict]:
  """Toy pairs from the Shakespeare corpus (see the module docstring)."""
  out = []
  for doc in corpus.load("shakespeare", split):
    words = doc["text"].split()
    if len(words) < prompt_words + response_words:
      continue
    response = words[prompt_words:prompt_words + response_words]
    out.append({"prompt": "Continue: " + " ".join(words[:prompt_words]),
                "chosen": " ".join(response), "rejected": " ".join(reversed(response))})
  return out


def register_preference_task(name: str, records: Callable[[str], list[dict]],
                             vocabulary: Optional[seqio.Vocabulary] = None,
                             splits=("train", "validation")) -> seqio.Task:
  """A seqio task of `records(split)` -> [{prompt, chosen, rejected}] tokenized by `vocabulary`."""
  vocabulary = vocabulary or vocab_lib.default_vocabulary()

  def dataset_fn(split, shuffle_files=False, seed=None):  # pylint: disable=unused-argument
    rows = records(split)
    missing = [f for f in FIELDS if rows and f not in rows[0]]
    if missing:
      raise ValueError(f"preference records of {name!r} lack fields {missing}; need {FIELDS}")
    return tf.data.Dataset.from_tensor_slices({f: [r[f] for r in rows] for f in FIELDS})

  features = {f: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32) for f in FIELDS}
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=splits),
      preprocessors=[seqio.preprocessors.tokenize], output_features=features)


@dataclasses.dataclass
class PairStats:
  pairs: int = 0
  dropped: int = 0  # prompt too long for a response
  truncated: int = 0  # responses cut at the end


def _frame(style: str, ids: vocab_lib.SpecialIds):
  """(tokens before the prompt, between prompt and response, after the response)."""
  if style == "chatglm3":
    return [ids.gmask, ids.sop, ids.user, ids.newline], [ids.assistant, ids.newline], [ids.eop]
  if style == "instruction":
    return [], [ids.newline], [ids.eos]
  raise ValueError(f"preference style={style!r} is not one of {STYLES}")


def pair_rows(prompt, chosen, rejected, sequence_length: int, style: str, ids: vocab_lib.SpecialIds,
              stats: Optional[PairStats] = None) -> Optional[dict]:
  """Two rows (chosen, rejected) of [sequence_length] batch fields, or None (prompt too long)."""
  head, middle, tail = _frame(style, ids)
  context = head + list(prompt) + middle
  if len(context) + 1 > sequence_length:
    if stats is not None:
      stats.dropped += 1
    return None
  rows = {k: np.zeros((2, sequence_length), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
  rows["loss_mask"] = np.zeros((2, sequence_length), np.float32)
  for r, response in enumerate((chosen, rejected)):
    seq = context + list(response) + tail
    if len(seq) - 1 > sequence_length:
      seq = seq[:sequence_length + 1]
      if stats is not None:
        stats.truncated += 1
    n = len(seq) - 1
    rows["tokens"][r, :n] = seq[:-1]
    rows["targets"][r, :n] = seq[1:]
    rows["segment_ids"][r, :n] = 1
    rows["positions"][r, :n] = np.arange(n)
    rows["loss_mask"][r, len(context) - 1:n] = 1.0  # predictions of the response and its end
  if stats is not None:
    stats.pairs += 1
  return rows


def pair_batches(task_name: str, split: str, *, pairs: int, sequence_length: int,
                 style: str = "instruction", shuffle: bool = False, seed: Optional[int] = None,
                 stats: Optional[PairStats] = None) -> Iterator[dict]:
  """Batches of `pairs` pairs (2 * pairs rows, chosen at even rows) from a preference task; the
  last incomplete batch is dropped."""
  task = seqio.get_mixture_or_task(task_name)
  vocabulary = task.output_features["prompt"].vocabulary
  ids = vocab_lib.special_ids(vocabulary)
  _frame(style, ids)  # checks the style before any data is read
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed)
  buffer = []
  for example in dataset.as_numpy_iterator():
    rows = pair_rows(example["prompt"], example["chosen"], example["rejected"], sequence_length, style,
                     ids, stats)
    if rows is None:
      continue
    buffer.append(rows)
    if len(buffer) == pairs:
      yield {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
      buffer = []


TOY_TASK = "glmjax_preference_shakespeare"


def register_toy_task() -> str:
  """Registers `corpus_preference_records` as TOY_TASK once; returns its name."""
  if TOY_TASK not in seqio.TaskRegistry.names():
    register_preference_task(TOY_TASK, corpus_preference_records)
  return TOY_TASK
