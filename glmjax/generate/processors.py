"""Logits processors: pure functions `(logits [B, V], history) -> logits [B, V]`.

They compose left to right (`compose`). `history` is what the model has been
fed so far, in cache-slot order: `tokens` [B, S], `valid` [B, S] (False for
padding and empty slots) and `index` (the next slot to be written). The
penalties follow HuggingFace's definitions so results can be compared:

- repetition penalty (Keskar et al. 2019, CTRL): a logit of a token already in
  the history is divided by `penalty` when positive, multiplied when negative;
- no-repeat n-gram: a token that would complete an n-gram already present in
  the history is forbidden;
- temperature, top-k, top-p (Holtzman et al. 2020, nucleus sampling) reshape
  the distribution before sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class History:
  tokens: jax.Array  # [B, S]
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # [] next slot to write


Processor = Callable[[jax.Array, History], jax.Array]


def compose(processors: Sequence[Processor]) -> Processor:
  def apply(logits, history):
    for processor in processors:
      logits = processor(logits, history)
    return logits
  return apply


def forbid_tokens(token_ids: Sequence[int]) -> Processor:
  """Never emit any of `token_ids` (e.g. [MASK] or padding)."""
  ids = tuple(int(i) for i in token_ids)

  def apply(logits, history):
    del history
    return logits.at[:, jnp.asarray(ids, jnp.int32)].set(NEG_INF)
  return apply


def _present_tokens(logits, history: History):
  """[B, V] bool: token occurs in a valid history slot."""
  B = logits.shape[0]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], history.tokens.shape)
  hits = jnp.zeros(logits.shape, jnp.int32).at[rows, history.tokens].max(history.valid.astype(jnp.int32))
  return hits > 0


def repetition_penalty(penalty: float) -> Processor:
  if penalty <= 0:
    raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {penalty}")

  def apply(logits, history):
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(_present_tokens(logits, history), penalised, logits)
  return apply


def no_repeat_ngram(n: int) -> Processor:
  """Bans every token that would repeat an n-gram of the history.

  An n-gram counts only if all its slots are valid, and the n-1 most recent
  slots (the prefix of the n-gram being completed) must be valid too.
  """
  if n < 1:
    raise ValueError(f"no_repeat_ngram_size must be >= 1 (0 disables it), got {n}")

  def apply(logits, history):
    tokens, valid = history.tokens, history.valid
    B, S = tokens.shape
    if S < n:
      return logits
    windows = S - n + 1
    gram_tokens = jnp.stack([tokens[:, o:o + windows] for o in range(n)])  # [n, B, W]
    gram_valid = jnp.all(jnp.stack([valid[:, o:o + windows] for o in range(n)]), axis=0)
    if n == 1:
      match = gram_valid
    else:
      start = jnp.maximum(history.index - (n - 1), 0)
      prefix = jax.lax.dynamic_slice(tokens, (0, start), (B, n - 1))  # [B, n-1]
      prefix_ok = jnp.all(jax.lax.dynamic_slice(valid, (0, start), (B, n - 1)), axis=1)
      prefix_ok = prefix_ok & (history.index >= n - 1)
      same = jnp.all(gram_tokens[:-1] == jnp.transpose(prefix)[:, :, None], axis=0)  # [B, W]
      match = gram_valid & same & prefix_ok[:, None]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, windows))
    banned = jnp.zeros(logits.shape, jnp.int32).at[rows, gram_tokens[-1]].max(match.astype(jnp.int32))
    return jnp.where(banned > 0, NEG_INF, logits)
  return apply


def temperature(value: float) -> Processor:
  if value <= 0:
    raise ValueError(f"temperature must be > 0 (use greedy decoding for 0), got {value}")

  def apply(logits, history):
    del history
    return logits / value
  return apply


def top_k(k: int) -> Processor:
  """Keeps the k largest logits (ties at the k-th value are all kept)."""
  if k < 1:
    raise ValueError(f"top_k must be >= 1 (0 disables it), got {k}")

  def apply(logits, history):
    del history
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits < kth, NEG_INF, logits)
  return apply


def top_p(p: float) -> Processor:
  """Nucleus: keeps the smallest set of most probable tokens whose mass reaches p.

  The most probable token always survives.
  """
  if not 0 < p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1.0 disables it), got {p}")

  def apply(logits, history):
    del history
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)
  return apply
