"""Decode-time attention: a few new queries against a long KV cache (plain XLA).

The rule is the batch contract's (DESIGN.md s.2, `glmjax.model.batch.may_attend`)
with row indices replaced by cache slots: the query in slot i sees the key in
slot j iff both carry the same non-zero segment id and (j <= i or key j is
bidirectional). Empty slots (beyond a row's length, or left padding) have
segment id 0, which is how per-sequence lengths are expressed;
`segment_ids_from_lengths` builds them.

There is no Pallas decode kernel: with one to a few queries the score tensor
is [b, heads, lq, S], O(S) per query like the cache itself, and the work is a
memory-bound read of the cache that XLA's fused einsums already do in one
pass. A split-K kernel could only pay off on hardware, where it would have to
be measured against this path; no accelerator was available to measure it.
"""

from __future__ import annotations

import jax.numpy as jnp

from glmjax.model.batch import may_attend
from glmjax.pallas.reference import masked_attention


def segment_ids_from_lengths(kv_lengths, cache_length: int):
  """int32 [b, cache_length]: 1 for the first kv_lengths[b] slots of each row, 0 after."""
  slots = jnp.arange(cache_length, dtype=jnp.int32)
  return (slots[None, :] < jnp.asarray(kv_lengths, jnp.int32)[:, None]).astype(jnp.int32)


def decode_attention(q, k_cache, v_cache, *, query_slots, query_segment_ids, key_segment_ids,
                     key_bidirectional, alibi_slopes=None, alibi_key_slots=None, scale=None):
  """Attention of lq new queries over all S cache slots, GQA without repeating the cache.

  Args:
    q: [b, lq, heads, d]; k_cache, v_cache: [b, S, kv_heads, d] (the new
      tokens' keys already written into their slots).
    query_slots: int [lq] (shared write index) or [b, lq], the slot of each query.
    query_segment_ids: int [b, lq]; key_segment_ids, key_bidirectional: [b, S].
    alibi_slopes: optional [heads]; bias slope * (j - i) on slot indices.
    alibi_key_slots: optional int [b, S], the key positions j of that bias where they are not the
      slot indices (P-Tuning v2's prefix keys sit just before each row's first real token).
  Returns:
    [b, lq, heads, d] in q.dtype; queries that see no key give zeros.
  """
  batch, q_length = q.shape[:2]
  cache_length = k_cache.shape[1]
  if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != q.shape[3]:
    raise ValueError(f"k_cache and v_cache must be [batch, cache_length, kv_heads, head_dim] "
                     f"matching q, got {q.shape=} {k_cache.shape=} {v_cache.shape=}")
  query_slots = jnp.broadcast_to(jnp.asarray(query_slots, jnp.int32), (batch, q_length))
  key_slots = jnp.arange(cache_length, dtype=jnp.int32)
  q_seg, k_seg = jnp.asarray(query_segment_ids), jnp.asarray(key_segment_ids)
  mask = may_attend(q_seg[:, :, None], k_seg[:, None, :], jnp.asarray(key_bidirectional)[:, None, :],
                    query_slots[:, :, None], key_slots[None, None, :])
  bias = None
  if alibi_slopes is not None:
    bias_key_slots = key_slots[None, None, :] if alibi_key_slots is None else jnp.asarray(
        alibi_key_slots, jnp.int32)[:, None, :]
    distance = (bias_key_slots - query_slots[:, :, None]).astype(jnp.float32)
    bias = jnp.asarray(alibi_slopes, jnp.float32)[None, :, None, None] * distance[:, None]
  return masked_attention(q, k_cache, v_cache, mask=mask, bias=bias, scale=scale)
