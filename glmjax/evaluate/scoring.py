"""Scoring on token ids, as GLM evaluates: teacher-forced log-probabilities of answers.

Multiple choice: each option's summed log-probability (optionally divided by
its length) given the context, the option either filled into the context's
blank (GLM: Part A = context with its [MASK] / [gMASK], Part B = <sop> +
option, positions per the spec) or appended to the context (plain LM).
Single-token cloze: one forward per context, the log-probabilities of the
verbalizer tokens at the position that predicts the blank. Language-model
metrics (per-token NLL, accuracy) over batches of the batch contract.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.generate.glm import GLM, Convention, glm_row, scoring_row
from glmjax.model import forward
from glmjax.model.batch import target_is_argmax
from glmjax.model.config import ModelConfig

ROW_FIELDS = ("tokens", "positions", "block_positions", "bidirectional", "targets", "loss_mask")
MODES = ("blank", "append")


@functools.partial(jax.jit, static_argnames=("config",))
def _target_scores(params, batch, config):
  """Per-token log p(target) and whether the target is the argmax (first max on ties), both [B, L]."""
  logits = forward(params, batch, config)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return target_logp, target_is_argmax(logits, batch["targets"])


@functools.partial(jax.jit, static_argnames=("config",))
def _logprobs_at(params, batch, index_B, config):
  """log-softmax [B, V] at position index_B[b] of each row."""
  logits = forward(params, batch, config)
  rows = jnp.take_along_axis(logits, index_B[:, None, None], axis=1)[:, 0]
  return jax.nn.log_softmax(rows, axis=-1)


def bucket_length(longest: int, config: ModelConfig, multiple: int = 16) -> int:
  if longest > config.max_length:
    raise ValueError(f"a scored row has {longest} tokens, more than ModelConfig.max_length="
                     f"{config.max_length}; shorten the context (or options)")
  return min(-(-longest // multiple) * multiple, config.max_length)


def stack_rows(rows: Sequence[dict], length: int, batch_size: int) -> dict:
  """Right-pads rows to `length` (segment 0 after each row) and the batch to `batch_size` rows."""
  batch = {k: np.zeros((batch_size, length), np.float32 if k == "loss_mask" else np.int32)
           for k in ROW_FIELDS + ("segment_ids",)}
  for b, row in enumerate(rows):
    n = len(row["tokens"])
    for key in ROW_FIELDS:
      if key in row:
        batch[key][b, :n] = row[key]
    batch["segment_ids"][b, :n] = 1
  return batch


def check_positions(batch: dict, config: ModelConfig) -> None:
  """Learned position tables have max_length rows; a larger id would read past the table
  (jnp.take fills with NaN), so it is refused here with the fix."""
  if not config.uses_learned_positions:
    return
  keys = ("positions", "block_positions") if config.position == "learned_2d" else ("positions",)
  for key in keys:
    largest = int(np.max(batch[key])) if key in batch else 0
    if largest >= config.max_length:
      raise ValueError(f"batch {key} reach {largest}, past the model's learned table of "
                       f"ModelConfig.max_length={config.max_length} ids; use shorter rows "
                       f"(--sequence_length {config.max_length - 1} or less)")


def _batches(rows: Sequence[dict], batch_size: int) -> Iterator[tuple[int, list]]:
  for start in range(0, len(rows), batch_size):
    yield start, list(rows[start:start + batch_size])


@dataclasses.dataclass
class RowScore:
  logprob: float  # sum of log p(target) over the loss mask
  tokens: int  # number of scored tokens
  correct: int  # scored tokens that are the argmax


def score_rows(params, config: ModelConfig, rows: Sequence[dict], *, batch_size: int = 8,
               length: int = 0) -> list[RowScore]:
  """Teacher-forced scores of rows (batch-contract fields + targets + loss_mask, as lists).

  Batches are [batch_size, length] (`length` 0: the longest row rounded up to 16)."""
  if not rows:
    return []
  longest = max(len(r["tokens"]) for r in rows)
  if length and longest > length:
    raise ValueError(f"a scored row has {longest} tokens, more than length={length}")
  length = length or bucket_length(longest, config)
  out = []
  for _, chunk in _batches(rows, batch_size):
    batch = stack_rows(chunk, length, batch_size)
    check_positions(batch, config)
    logp, hit = jax.device_get(_target_scores(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                              config))
    mask = batch["loss_mask"] > 0
    for b in range(len(chunk)):
      out.append(RowScore(logprob=float(np.sum(logp[b][mask[b]], dtype=np.float64)),
                          tokens=int(mask[b].sum()), correct=int(hit[b][mask[b]].sum())))
  return out


def blank_index(context: Sequence[int], mask_ids: Sequence[int]) -> Optional[int]:
  """Index of the first blank of `context`, or None."""
  return next((i for i, t in enumerate(context) if t in mask_ids), None)


def with_blank(context: Sequence[int], mask_ids: Sequence[int], gmask_id: int) -> tuple[list, int]:
  """(Part A, blank index): the context's own blank, else `[gMASK]` appended (the Flan format)."""
  index = blank_index(context, mask_ids)
  if index is None:
    return list(context) + [gmask_id], len(context)
  return list(context), index


def append_row(context: Sequence[int], option: Sequence[int]) -> dict:
  """Plain LM row: context then option, positions 0.., causal; targets = option."""
  tokens = list(context) + list(option)[:-1]
  n, c = len(tokens), len(context)
  return {"tokens": tokens, "positions": list(range(n)), "block_positions": [0] * n,
          "bidirectional": [0] * n, "targets": [0] * (c - 1) + list(option),
          "loss_mask": [0] * (c - 1) + [1] * len(option)}


@dataclasses.dataclass(frozen=True)
class Specials:
  """The token ids scoring needs (a subset of glmjax.tasks.vocab.SpecialIds)."""
  mask_ids: tuple
  gmask: int
  sop: int
  eop: int

  @classmethod
  def from_ids(cls, ids) -> "Specials":
    return cls(mask_ids=(ids.mask, ids.smask, ids.gmask), gmask=ids.gmask, sop=ids.sop, eop=ids.eop)


def option_rows(context: Sequence[int], options: Sequence[Sequence[int]], *, mode: str,
                specials: Specials, convention: Convention = GLM, score_eop: bool = False) -> list[dict]:
  """One scoring row per option. `score_eop` adds <eop> after each option (blank mode)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  for i, option in enumerate(options):
    if not option:
      raise ValueError(f"option {i} is empty; every option needs at least one token")
  if mode == "append":
    if not context:
      raise ValueError("append mode needs a non-empty context (the option's first token is "
                       "predicted from the context's last)")
    return [append_row(context, o) for o in options]
  part_a, index = with_blank(context, specials.mask_ids, specials.gmask)
  eop = specials.eop if score_eop else None
  return [scoring_row(part_a, o, index, specials.sop, convention, eop) for o in options]


@dataclasses.dataclass
class Choice:
  scores: list  # one per option (summed or length-normalised log-probability)
  logprobs: list  # summed log-probability per option
  best: int


def multiple_choice(params, config: ModelConfig, contexts: Sequence[Sequence[int]],
                    options: Sequence[Sequence[Sequence[int]]], *, mode: str = "blank",
                    specials: Specials, convention: Convention = GLM, length_normalize: bool = False,
                    score_eop: bool = False, batch_size: int = 8) -> list[Choice]:
  """Picks, per context, the option of highest (length-normalised) log-probability."""
  rows, owners = [], []
  for c, (context, opts) in enumerate(zip(contexts, options)):
    rows += option_rows(context, opts, mode=mode, specials=specials, convention=convention,
                        score_eop=score_eop)
    owners += [c] * len(opts)
  scores = score_rows(params, config, rows, batch_size=batch_size)
  out = [Choice(scores=[], logprobs=[], best=-1) for _ in contexts]
  for owner, s in zip(owners, scores):
    out[owner].logprobs.append(s.logprob)
    out[owner].scores.append(s.logprob / s.tokens if length_normalize else s.logprob)
  for choice in out:
    choice.best = int(np.argmax(choice.scores))
  return out


def cloze(params, config: ModelConfig, contexts: Sequence[Sequence[int]],
          verbalizers: Sequence[Sequence[int]], *, mode: str = "blank", specials: Specials,
          convention: Convention = GLM, batch_size: int = 8) -> list[Choice]:
  """Single-token cloze: log p(verbalizer token) at the blank, one forward per context.

  `verbalizers[c]` lists one token id per label for context c. In blank mode
  the row is Part A + <sop> and the distribution is read at <sop>; in append
  mode it is read at the context's last token.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  rows, index = [], []
  for context in contexts:
    if mode == "append":
      n = len(context)
      rows.append({"tokens": list(context), "positions": list(range(n)), "block_positions": [0] * n,
                   "bidirectional": [0] * n})
    else:
      part_a, blank = with_blank(context, specials.mask_ids, specials.gmask)
      rows.append(glm_row(part_a, [specials.sop], blank, convention))
    index.append(len(rows[-1]["tokens"]) - 1)
  length = bucket_length(max(len(r["tokens"]) for r in rows), config)
  out = []
  for start, chunk in _batches(rows, batch_size):
    batch = stack_rows(chunk, length, batch_size)
    check_positions(batch, config)
    where = np.zeros(batch_size, np.int32)
    where[:len(chunk)] = index[start:start + len(chunk)]
    logp = np.asarray(_logprobs_at(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                   jnp.asarray(where), config))
    for b in range(len(chunk)):
      ids = list(verbalizers[start + b])
      scores = [float(logp[b, t]) for t in ids]
      out.append(Choice(scores=scores, logprobs=scores, best=int(np.argmax(scores))))
  return out


@dataclasses.dataclass
class LMTotals:
  nll: float = 0.0
  correct: float = 0.0
  tokens: float = 0.0

  def add(self, params, config: ModelConfig, batch: dict) -> None:
    """Adds one batch of the batch contract (numpy, with targets and loss_mask)."""
    check_positions(batch, config)
    keys = ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")
    device = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
    logp, hit = jax.device_get(_target_scores(params, device, config))
    mask = np.asarray(batch["loss_mask"], np.float64)
    self.nll -= float(np.sum(logp * mask))
    self.correct += float(np.sum(hit * mask))
    self.tokens += float(mask.sum())

  def metrics(self) -> dict:
    n = max(self.tokens, 1.0)
    return {"nll": self.nll / n, "perplexity": float(np.exp(self.nll / n)),
            "accuracy": self.correct / n, "tokens": self.tokens}
