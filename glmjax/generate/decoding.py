"""Jitted decoding loops over the KV cache: greedy, sampling and beam search.

Every loop starts from a prompt chunk (left-padded batch-contract fields),
runs it through `glmjax.model.decode.extend`, then emits one token per row per
`lax.while_loop` iteration until every row has produced a stop token or
`max_new_tokens` tokens. A generated token's position ids follow a static
rule from the previous token's: plain text advances `positions` by one; a GLM
Part B span keeps `positions` (the mask's index) and advances
`block_positions` by one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.generate import processors as procs
from glmjax.model import decode
from glmjax.model.config import ModelConfig

STRATEGIES = ("greedy", "sample", "beam")
PLAIN_TEXT = (1, 0)  # (position step, block-position step)
GLM_SPAN = (0, 1)


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  """How to pick tokens. Hashable: it is a static argument of the jitted loops.

  Penalties (repetition, no-repeat n-gram, forbidden ids, `extra_processors`)
  apply to every strategy; temperature / top-k / top-p only to sampling.
  Beam scores are summed log-probabilities divided by
  (number of generated tokens, stop token included) ** length_penalty.
  """
  max_new_tokens: int = 32
  strategy: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0
  forbidden_ids: tuple = ()
  num_beams: int = 4
  length_penalty: float = 1.0
  stop_ids: tuple = ()
  pad_id: int = 0
  seed: int = 0
  extra_processors: tuple = ()  # callables (logits [B, V], History) -> logits

  def __post_init__(self):
    def need(ok, field, message):
      if not ok:
        raise ValueError(f"GenerationOptions.{field}: {message}")
    need(self.strategy in STRATEGIES, "strategy", f"{self.strategy!r} is not one of {STRATEGIES}")
    need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
    need(self.temperature > 0, "temperature", f"must be > 0 (use strategy='greedy'), got {self.temperature}")
    need(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
    need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
    need(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1.0 disables it)")
    need(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0 (0 disables it)")
    need(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
    for field in ("forbidden_ids", "stop_ids", "extra_processors"):
      need(isinstance(getattr(self, field), tuple), field, "must be a tuple (options are hashable)")

  def penalties(self) -> list:
    out = []
    if self.repetition_penalty != 1.0:
      out.append(procs.repetition_penalty(self.repetition_penalty))
    if self.no_repeat_ngram_size:
      out.append(procs.no_repeat_ngram(self.no_repeat_ngram_size))
    if self.forbidden_ids:
      out.append(procs.forbid_tokens(self.forbidden_ids))
    return out + list(self.extra_processors)

  def warpers(self) -> list:
    out = []
    if self.temperature != 1.0:
      out.append(procs.temperature(self.temperature))
    if self.top_k:
      out.append(procs.top_k(self.top_k))
    if self.top_p < 1.0:
      out.append(procs.top_p(self.top_p))
    return out


@dataclasses.dataclass
class GenerationResult:
  """Host-side result. `tokens` [B, N] holds each row's new tokens (stop token
  included, `pad_id` after it), `lengths` [B] counts them, `finished` [B] says
  whether the row ended on a stop token. `logits` [B, N, V]: the model's raw
  float32 logits for each emitted token (when asked). `scores` [B]: beam score."""
  tokens: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray
  logits: Optional[np.ndarray] = None
  scores: Optional[np.ndarray] = None

  def sequences(self, strip_stop: bool = True) -> list[list[int]]:
    out = []
    for row, n, done in zip(self.tokens, self.lengths, self.finished):
      n = int(n) - int(bool(done) and strip_stop)
      out.append([int(t) for t in row[:n]])
    return out


# --- Prompts ----------------------------------------------------------------------------------

def text_prompt(tokens: Sequence[int], bidirectional: bool = False) -> dict:
  """Plain (or prefix-LM, when `bidirectional`) prompt fields for one row."""
  n = len(tokens)
  return {"tokens": list(tokens), "positions": list(range(n)), "block_positions": [0] * n,
          "bidirectional": [int(bidirectional)] * n}


def left_pad(rows: Sequence[dict], pad_id: int = 0, length: Optional[int] = None) -> dict:
  """Stacks per-row prompt fields into [B, P] int32 arrays, padding on the left.

  Left padding makes every row's last prompt token land in the same cache
  slot, so one shared write index serves the batch. Padding has segment 0.
  """
  if not rows:
    raise ValueError("no prompts given")
  longest = max(len(r["tokens"]) for r in rows)
  if longest == 0:
    raise ValueError("every prompt is empty; give at least one token (e.g. a BOS or <sop>)")
  length = longest if length is None else length
  fields = ("tokens", "positions", "block_positions", "bidirectional")
  out = {k: np.zeros((len(rows), length), np.int32) for k in fields + ("segment_ids",)}
  out["tokens"][:] = pad_id
  for b, row in enumerate(rows):
    n = len(row["tokens"])
    if n == 0:
      raise ValueError(f"prompt {b} is empty; give at least one token")
    for key in fields:
      values = row.get(key, [0] * n)
      if len(values) != n:
        raise ValueError(f"prompt {b}: field {key!r} has {len(values)} entries, tokens has {n}")
      out[key][b, length - n:] = values
    out["segment_ids"][b, length - n:] = 1
  return out


def check_prompt_ids(chunk: dict, config: ModelConfig, total_length: int, max_block_position: int = 0):
  """Host-side checks before any compile: ids in the vocabulary, lengths within the model."""
  tokens = np.asarray(chunk["tokens"])
  real = np.asarray(chunk["segment_ids"]) != 0
  bad = real & ((tokens < 0) | (tokens >= config.vocab_size))
  if bad.any():
    b, i = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt {b} has token id {int(tokens[b, i])} at index {i}, outside the "
                     f"vocabulary [0, {config.vocab_size}); check the tokenizer matches the model")
  if total_length > config.max_length:
    raise ValueError(f"prompt + generated tokens need {total_length} cache slots, more than "
                     f"ModelConfig.max_length={config.max_length}; shorten the prompt or lower "
                     "max_new_tokens")
  if config.position == "learned_2d" and max_block_position >= config.position_table_rows:
    raise ValueError(f"block positions up to {max_block_position} exceed the learned table "
                     f"(max_length={config.max_length}); lower max_new_tokens")


# --- Greedy and sampling ----------------------------------------------------------------------

def _history(cache: decode.KVCache) -> procs.History:
  return procs.History(tokens=cache.tokens, valid=cache.segment_ids != 0, index=cache.index)


def _feed(params, cache, tokens_B, positions_B, blocks_B, live_B, config):
  chunk = {"tokens": tokens_B[:, None], "positions": positions_B[:, None],
           "block_positions": blocks_B[:, None], "segment_ids": live_B.astype(jnp.int32)[:, None]}
  logits, cache = decode.extend(params, cache, chunk, config, last_only=True)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config", "options", "step_rule", "return_logits",
                                               "on_token", "feed_last", "ordered_callback"))
def sample_continuation(params, cache, chunk, active_B, rng, *, config: ModelConfig,
                        options: GenerationOptions, step_rule=PLAIN_TEXT, return_logits=False,
                        on_token: Optional[Callable] = None, feed_last=False, ordered_callback=True):
  """Greedy or sampled continuation of `chunk` (rows with active=False emit nothing).

  With `feed_last`, a row cut at max_new_tokens still feeds its last token to
  the cache (GLM blank filling: the next span must see the whole of this one).

  Returns (tokens [B, N], lengths [B], finished [B], logits [B, N, V] or None, cache).
  The token of step t is drawn with key fold_in(rng, t), so a seed reproduces a run.
  """
  N = options.max_new_tokens
  logits, cache = decode.extend(params, cache, chunk, config, last_only=True)
  B, _, V = logits.shape
  penalise = procs.compose(options.penalties())
  warp = procs.compose(options.warpers())
  stop_ids = jnp.asarray(options.stop_ids or (-1,), jnp.int32)
  dpos, dblock = step_rule

  state = dict(
      step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, 0],
      positions=chunk["positions"][:, -1], blocks=chunk["block_positions"][:, -1],
      done=~active_B.astype(bool), finished=jnp.zeros((B,), bool),
      lengths=jnp.zeros((B,), jnp.int32),
      tokens=jnp.full((B, N), options.pad_id, jnp.int32),
      all_logits=jnp.zeros((B, N, V) if return_logits else (0,), jnp.float32))

  def pick(step, logits_BV, cache):
    scores = penalise(logits_BV, _history(cache))
    if options.strategy == "greedy":
      return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    scores = warp(scores, _history(cache))
    return jax.random.categorical(jax.random.fold_in(rng, step), scores, axis=-1).astype(jnp.int32)

  def body(s):
    step, done = s["step"], s["done"]
    token = jnp.where(done, options.pad_id, pick(step, s["logits"], s["cache"]))
    stop = ~done & jnp.isin(token, stop_ids)
    if on_token is not None:
      jax.debug.callback(on_token, step, token, done, ordered=ordered_callback)
    positions, blocks = s["positions"] + dpos, s["blocks"] + dblock
    now_done = done | stop
    out = dict(s, step=step + 1, done=now_done, finished=s["finished"] | stop,
               lengths=s["lengths"] + (~done).astype(jnp.int32),
               tokens=jax.lax.dynamic_update_slice(s["tokens"], token[:, None], (0, step)),
               positions=positions, blocks=blocks)
    if return_logits:
      out["all_logits"] = jax.lax.dynamic_update_slice(s["all_logits"], s["logits"][:, None],
                                                       (0, step, 0))
    keep_going = ((step + 1 < N) | feed_last) & ~jnp.all(now_done)
    out["logits"], out["cache"] = jax.lax.cond(
        keep_going,
        lambda: _feed(params, s["cache"], token, positions, blocks, ~now_done, config),
        lambda: (s["logits"], s["cache"]))
    return out

  def cond(s):
    return (s["step"] < N) & ~jnp.all(s["done"])

  s = jax.lax.while_loop(cond, body, state)
  return s["tokens"], s["lengths"], s["finished"], (s["all_logits"] if return_logits else None), s["cache"]


# --- Beam search ------------------------------------------------------------------------------

def _length_norm(lengths, length_penalty: float):
  return jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty


@functools.partial(jax.jit, static_argnames=("config", "options", "step_rule"))
def beam_continuation(params, cache, chunk, active_B, *, config: ModelConfig,
                      options: GenerationOptions, step_rule=PLAIN_TEXT):
  """Beam search with `options.num_beams` beams and length penalty.

  Alive beams are ranked by summed log-probability; a beam that emits a stop
  token moves to the row's finished set with score logp / len ** length_penalty.
  A row stops once its finished set is full and no alive beam can still beat
  its worst member (the bound of T5X / Flax: with length_penalty > 0 the best
  reachable score is logp / max_new_tokens ** length_penalty, otherwise
  logp / current_length ** length_penalty). At the end, alive beams compete
  with the finished ones at their current length.

  Returns (tokens [B, N], lengths [B], finished [B], scores [B], cache of B * W rows).
  """
  W, N = options.num_beams, options.max_new_tokens
  lp = options.length_penalty
  logits, cache = decode.extend(params, cache, chunk, config, last_only=True)
  B, _, V = logits.shape
  penalise = procs.compose(options.penalties())
  stop_ids = jnp.asarray(options.stop_ids or (-1,), jnp.int32)
  dpos, dblock = step_rule
  neg_inf = jnp.float32(-jnp.inf)
  active_B = active_B.astype(bool)

  state = dict(
      step=jnp.zeros((), jnp.int32), cache=decode.repeat_rows(cache, W),
      logits=jnp.repeat(logits[:, 0], W, axis=0),
      positions=chunk["positions"][:, -1], blocks=chunk["block_positions"][:, -1],
      alive_logp=jnp.where(jnp.arange(W)[None, :] == 0, 0.0, neg_inf) * jnp.ones((B, 1)),
      alive_seq=jnp.full((B, W, N), options.pad_id, jnp.int32),
      fin_score=jnp.full((B, W), neg_inf), fin_seq=jnp.full((B, W, N), options.pad_id, jnp.int32),
      fin_len=jnp.zeros((B, W), jnp.int32), done=~active_B)

  def body(s):
    step, done = s["step"], s["done"]
    logp = jax.nn.log_softmax(s["logits"], axis=-1)
    logp = penalise(logp, _history(s["cache"])).reshape(B, W, V)
    cand = (s["alive_logp"][:, :, None] + logp).reshape(B, W * V)
    top_score, top_idx = jax.lax.top_k(cand, 2 * W)  # [B, 2W]
    parent, token = top_idx // V, (top_idx % V).astype(jnp.int32)
    seq = jnp.take_along_axis(s["alive_seq"], parent[:, :, None], axis=1)
    seq = jax.lax.dynamic_update_slice(seq, token[:, :, None], (0, 0, step))
    is_stop = jnp.isin(token, stop_ids) & jnp.isfinite(top_score)

    length = step + 1
    new_fin = jnp.where(is_stop, top_score / _length_norm(length, lp), neg_inf)
    pool_score = jnp.concatenate([s["fin_score"], new_fin], axis=1)
    pool_seq = jnp.concatenate([s["fin_seq"], seq], axis=1)
    pool_len = jnp.concatenate([s["fin_len"], jnp.full((B, 2 * W), length, jnp.int32)], axis=1)
    fin_score, fin_pick = jax.lax.top_k(pool_score, W)
    fin_seq = jnp.take_along_axis(pool_seq, fin_pick[:, :, None], axis=1)
    fin_len = jnp.take_along_axis(pool_len, fin_pick, axis=1)
    frozen = done[:, None]
    fin_score = jnp.where(frozen, s["fin_score"], fin_score)
    fin_seq = jnp.where(frozen[:, :, None], s["fin_seq"], fin_seq)
    fin_len = jnp.where(frozen, s["fin_len"], fin_len)

    alive_logp, alive_pick = jax.lax.top_k(jnp.where(is_stop, neg_inf, top_score), W)
    alive_seq = jnp.take_along_axis(seq, alive_pick[:, :, None], axis=1)
    alive_token = jnp.take_along_axis(token, alive_pick, axis=1)
    alive_parent = jnp.take_along_axis(parent, alive_pick, axis=1)

    if lp > 0:
      bound = alive_logp[:, 0] / _length_norm(N, lp)
    else:
      bound = alive_logp[:, 0] / _length_norm(length, lp)
    full = jnp.all(jnp.isfinite(fin_score), axis=1)
    cannot_improve = (full & (bound < fin_score[:, -1])) | ~jnp.isfinite(alive_logp[:, 0])
    now_done = done | cannot_improve | (length >= N)

    rows = (jnp.arange(B)[:, None] * W + alive_parent).reshape(B * W)
    cache = decode.reorder(s["cache"], rows)
    positions, blocks = s["positions"] + dpos, s["blocks"] + dblock
    live = (~now_done[:, None] & jnp.isfinite(alive_logp)).reshape(B * W)
    keep_going = ~jnp.all(now_done)
    logits, cache = jax.lax.cond(
        keep_going,
        lambda: _feed(params, cache, alive_token.reshape(B * W), jnp.repeat(positions, W),
                      jnp.repeat(blocks, W), live, config),
        lambda: (s["logits"], cache))
    return dict(step=length, cache=cache, logits=logits, positions=positions, blocks=blocks,
                alive_logp=alive_logp, alive_seq=alive_seq, fin_score=fin_score, fin_seq=fin_seq,
                fin_len=fin_len, done=now_done)

  def cond(s):
    return (s["step"] < N) & ~jnp.all(s["done"])

  s = jax.lax.while_loop(cond, body, state)
  steps = s["step"]
  alive_score = s["alive_logp"] / _length_norm(steps, lp)
  all_score = jnp.concatenate([s["fin_score"], alive_score], axis=1)
  all_seq = jnp.concatenate([s["fin_seq"], s["alive_seq"]], axis=1)
  all_len = jnp.concatenate([s["fin_len"], jnp.full((B, W), steps, jnp.int32)], axis=1)
  all_finished = jnp.concatenate([jnp.ones((B, W), bool), jnp.zeros((B, W), bool)], axis=1)
  best = jnp.argmax(all_score, axis=1)
  take = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
  tokens = jnp.take_along_axis(all_seq, best[:, None, None], axis=1)[:, 0]
  lengths = jnp.where(active_B, take(all_len), 0)
  tokens = jnp.where(active_B[:, None], tokens, options.pad_id)
  return tokens, lengths, take(all_finished) & active_B, take(all_score), s["cache"]


# --- Entry point on token ids -----------------------------------------------------------------

def _single_device(tree) -> bool:
  """JAX orders host callbacks only in single-device computations."""
  devices = set()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      devices |= set(leaf.sharding.device_set)
  return len(devices) <= 1


def continue_chunk(params, config: ModelConfig, cache, chunk: dict, active, options: GenerationOptions,
                   *, step_rule=PLAIN_TEXT, return_logits=False, on_token=None, feed_last=False):
  """Runs one prompt chunk and its continuation with the strategy of `options`.

  Returns (GenerationResult, cache). For beam search the cache comes back
  with batch * num_beams rows.
  """
  chunk = {k: jnp.asarray(v, jnp.int32) for k, v in chunk.items()}
  active = jnp.asarray(active, bool)
  if options.strategy == "beam":
    if return_logits or on_token is not None:
      raise ValueError("beam search returns neither per-step logits nor streamed tokens; "
                       "use strategy='greedy' or 'sample' for those")
    tokens, lengths, finished, scores, cache = beam_continuation(
        params, cache, chunk, active, config=config, options=options, step_rule=step_rule)
    result = GenerationResult(np.asarray(tokens), np.asarray(lengths), np.asarray(finished),
                              scores=np.asarray(scores))
    return result, cache
  rng = jax.random.key(options.seed)
  tokens, lengths, finished, logits, cache = sample_continuation(
      params, cache, chunk, active, rng, config=config, options=options, step_rule=step_rule,
      return_logits=return_logits, on_token=on_token, feed_last=feed_last,
      ordered_callback=on_token is not None and _single_device(params))
  result = GenerationResult(np.asarray(tokens), np.asarray(lengths), np.asarray(finished),
                            logits=None if logits is None else np.asarray(logits))
  return result, cache


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             options: GenerationOptions = GenerationOptions(), *, prefix_bidirectional: bool = False,
             return_logits: bool = False, on_token=None) -> GenerationResult:
  """Continues each prompt (a list of token ids) as plain text.

  `prefix_bidirectional` marks the prompts bidirectional (prefix LM / GLM
  Part A without a mask). `on_token(step, tokens [B], done [B])` is called
  from inside the jitted loop as each token is chosen (streaming); with params
  sharded over several devices JAX may deliver the calls out of order, so
  order them by `step`.
  """
  rows = [text_prompt(p, prefix_bidirectional) for p in prompts]
  chunk = left_pad(rows, options.pad_id)
  P = chunk["tokens"].shape[1]
  total = P + options.max_new_tokens
  check_prompt_ids(chunk, config, total)
  cache = decode.init_cache(config, len(rows), total)
  result, _ = continue_chunk(params, config, cache, chunk, np.ones(len(rows), bool), options,
                             return_logits=return_logits, on_token=on_token)
  return result
