"""KV-cache decoding: run a chunk of tokens against a cache of earlier keys and values.

One function, `extend`, serves prefill (the whole prompt as one chunk) and
decode (one token per row per step). The cache is stacked like the params:

  k, v            [layers, batch, length, kv_heads, head_dim]  keys after RoPE
  tokens          [batch, length]   token id held by each slot
  segment_ids     [batch, length]   0 marks an empty or padding slot
  bidirectional   [batch, length]   GLM Part A slots
  index           []                next slot to write, shared by all rows

Rows share one write index, so prompts of different lengths are left-padded
(padding slots have segment 0). The attention rule is the batch contract's
(DESIGN.md s.2) with the row index replaced by the cache slot: a query in slot
i sees the key in slot j iff both have the same non-zero segment and
(j <= i or bidirectional[j]). A chunk whose tokens are bidirectional (GLM Part
A) therefore attends among itself in both directions at prefill, and every
later token sees all of it plus the causal tokens before it. GQA/MQA caches
hold the kv heads only.

P-Tuning v2 (glmjax.tuning.prefix): when the params carry per-layer `prefix_k` / `prefix_v`
[layers, P, kv_heads, head_dim], each layer's attention sees them concatenated before its cache
slots (ChatGLM2-6B's ptuning passes them as the initial past_key_values and prepends P ones to
the attention mask): P extra key slots, visible to every non-padding query of the row (their
segment is the row's, they precede every query), never written to the cache; positions of the
real tokens are unchanged. This equals the full forward over `prefix.with_prefix_rows` batches.

Mixture-of-experts caveat: expert capacity depends on how many tokens are
routed together, so a capacity-limited MoE model can drop different tokens
when run one token at a time than in a full forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glmjax import pallas
from glmjax.model import batch as batch_lib
from glmjax.model import transformer
from glmjax.model.config import ModelConfig
from glmjax.model.constraints import constrain

KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
SLOT_AXES = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class KVCache:
  k: jax.Array
  v: jax.Array
  tokens: jax.Array
  segment_ids: jax.Array
  bidirectional: jax.Array
  index: jax.Array

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def length(self) -> int:
    return self.tokens.shape[1]


jax.tree_util.register_dataclass(
    KVCache, data_fields=["k", "v", "tokens", "segment_ids", "bidirectional", "index"],
    meta_fields=[])


def init_cache(config: ModelConfig, batch_size: int, length: int, dtype=None) -> KVCache:
  """An empty cache of `length` slots (all segment 0) in the compute dtype."""
  if length > config.max_length:
    raise ValueError(f"cache length {length} exceeds ModelConfig.max_length={config.max_length}; "
                     "shorten the prompt or max_new_tokens, or raise max_length")
  dtype = jnp.dtype(dtype or config.dtype)
  kv_shape = (config.num_layers, batch_size, length, config.num_kv_heads, config.head_dim)
  slots = jnp.zeros((batch_size, length), jnp.int32)
  return constrain_cache(KVCache(k=jnp.zeros(kv_shape, dtype), v=jnp.zeros(kv_shape, dtype),
                                 tokens=slots, segment_ids=slots, bidirectional=slots,
                                 index=jnp.zeros((), jnp.int32)))


def constrain_cache(cache: KVCache) -> KVCache:
  return KVCache(k=constrain(cache.k, KV_AXES), v=constrain(cache.v, KV_AXES),
                 tokens=constrain(cache.tokens, SLOT_AXES),
                 segment_ids=constrain(cache.segment_ids, SLOT_AXES),
                 bidirectional=constrain(cache.bidirectional, SLOT_AXES), index=cache.index)


def _chunk_fields(chunk: dict, config: ModelConfig) -> dict:
  if "tokens" not in chunk or chunk["tokens"].ndim != 2:
    raise ValueError("chunk['tokens'] must be an int32 array [batch, length]; "
                     f"got keys {sorted(chunk)}")
  if "positions" not in chunk:
    raise ValueError("chunk['positions'] is required: the decoder cannot infer positions "
                     "(left padding, GLM Part B) from the cache slot")
  shape = chunk["tokens"].shape
  out = {k: jnp.asarray(v, jnp.int32) for k, v in chunk.items()}
  for key in ("segment_ids", "block_positions", "bidirectional"):
    out.setdefault(key, batch_lib.default_field(key, shape, jnp))
  for key, value in out.items():
    if value.shape != shape:
      raise ValueError(f"chunk[{key!r}] has shape {value.shape}, expected {shape} like chunk['tokens']")
  return out


def _write_slots(buffer_BS, values_BQ, index):
  return jax.lax.dynamic_update_slice(buffer_BS, values_BQ.astype(buffer_BS.dtype), (0, index))


def extend(params: dict, cache: KVCache, chunk: dict, config: ModelConfig, *,
           last_only: bool = False):
  """Runs `chunk` ([batch, Q] batch-contract fields) in cache slots [index, index + Q).

  Returns (float32 logits [batch, Q, vocab] or, with `last_only`, [batch, 1, vocab];
  the updated cache). The caller keeps index + Q <= cache.length (slots past
  the end are not written: dynamic_update_slice clamps).
  """
  chunk = _chunk_fields(chunk, config)
  B, Q = chunk["tokens"].shape
  if B != cache.batch_size:
    raise ValueError(f"chunk batch {B} != cache batch {cache.batch_size}")
  index = cache.index
  segment_ids = _write_slots(cache.segment_ids, chunk["segment_ids"], index)
  bidirectional = _write_slots(cache.bidirectional, chunk["bidirectional"], index)
  tokens = _write_slots(cache.tokens, chunk["tokens"], index)
  query_slots_Q = index + jnp.arange(Q, dtype=jnp.int32)

  ctx = transformer.position_context(chunk, config)
  x = constrain(transformer.embed(params, chunk, config), transformer.ACT_AXES)

  def layer_step(carry, layer_and_index):
    x, k_all, v_all = carry
    layer, li = layer_and_index
    layer = transformer.layers.materialize(layer)
    written = {}

    def attention(p, h):
      q, k, v = transformer.project_qkv(p, h, config)
      q, k = transformer.encode_positions(q, k, ctx, config)
      k_all_new = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], (li, 0, index, 0, 0))
      v_all_new = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], (li, 0, index, 0, 0))
      if "prefix_k" in p:  # P-Tuning v2: the prefix as P key slots before the cache's
        o = _attend_with_prefix(q, k_all_new[li].astype(q.dtype), v_all_new[li].astype(q.dtype), p,
                                query_slots_Q, chunk["segment_ids"], segment_ids, bidirectional,
                                ctx.alibi_slopes)
      else:
        o = pallas.decode_attention(q, k_all_new[li].astype(q.dtype), v_all_new[li].astype(q.dtype),
                                    query_slots=query_slots_Q, query_segment_ids=chunk["segment_ids"],
                                    key_segment_ids=segment_ids, key_bidirectional=bidirectional,
                                    alibi_slopes=ctx.alibi_slopes)
      written["kv"] = (k_all_new, v_all_new)
      return transformer.project_out(p, o, config)

    x, _ = transformer.block(layer, x, ctx, config, attn=attention)
    k_all, v_all = written["kv"]
    return (constrain(x, transformer.ACT_AXES), k_all, v_all), None

  layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
  (x, k_all, v_all), _ = jax.lax.scan(layer_step, (x, cache.k, cache.v), (params["layers"], layer_ids))
  if last_only:
    x = x[:, -1:]
  logits = transformer.logits_from_hidden(params, x, config)
  new_cache = KVCache(k=k_all, v=v_all, tokens=tokens, segment_ids=segment_ids,
                      bidirectional=bidirectional, index=index + Q)
  return logits, constrain_cache(new_cache)


def _attend_with_prefix(q, k, v, p, query_slots_Q, query_segment_ids, key_segment_ids,
                        key_bidirectional, alibi_slopes):
  """The P prefix slots (P-Tuning v2) in front of the cache. For ALiBi the prefix keys sit at
  the P positions just before each row's first real token (its first nonzero segment id), as in
  the full forward (prefix.with_prefix_rows) and transformers' BLOOM, whose ALiBi positions are
  the attention mask's cumulative sum: a left-padded short prompt's padding adds no distance."""
  B, S = k.shape[:2]
  P = p["prefix_k"].shape[0]
  prefix = lambda x: jnp.broadcast_to(x.astype(q.dtype)[None], (B,) + x.shape)  # noqa: E731
  row_segment = jnp.max(key_segment_ids, axis=1, keepdims=True)
  alibi_key_slots = None
  if alibi_slopes is not None:
    first_real = jnp.argmax(key_segment_ids != 0, axis=1).astype(jnp.int32)[:, None]
    alibi_key_slots = jnp.concatenate([first_real + jnp.arange(P, dtype=jnp.int32)[None],
                                       jnp.broadcast_to(P + jnp.arange(S, dtype=jnp.int32), (B, S))], axis=1)
  return pallas.decode_attention(
      q, jnp.concatenate([prefix(p["prefix_k"]), k], axis=1),
      jnp.concatenate([prefix(p["prefix_v"]), v], axis=1),
      query_slots=query_slots_Q + P, query_segment_ids=query_segment_ids,
      key_segment_ids=jnp.concatenate([jnp.broadcast_to(row_segment, (B, P)), key_segment_ids], axis=1),
      key_bidirectional=jnp.concatenate([jnp.zeros((B, P), key_bidirectional.dtype), key_bidirectional],
                                        axis=1),
      alibi_slopes=alibi_slopes, alibi_key_slots=alibi_key_slots)


def reorder(cache: KVCache, batch_indices) -> KVCache:
  """Gathers cache rows (beam search: follow each surviving beam's parent)."""
  take = lambda x, axis: jnp.take(x, batch_indices, axis=axis)
  return constrain_cache(KVCache(k=take(cache.k, 1), v=take(cache.v, 1), tokens=take(cache.tokens, 0),
                                 segment_ids=take(cache.segment_ids, 0),
                                 bidirectional=take(cache.bidirectional, 0), index=cache.index))


def repeat_rows(cache: KVCache, times: int) -> KVCache:
  """Each row repeated `times` times consecutively (row b -> rows b*times .. b*times+times-1)."""
  return reorder(cache, jnp.repeat(jnp.arange(cache.batch_size), times))
