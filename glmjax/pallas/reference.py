"""Plain XLA attention: the reference every kernel is tested against.

It materialises the [batch, heads, lq, lk] score matrix, so memory is O(L^2);
the tiled kernel in this package computes the same function in O(L).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from glmjax.model.batch import may_attend


def attention_mask(segment_ids, bidirectional):
  """Boolean [batch, lq, lk] mask of the packing + GLM rule (DESIGN.md s.2).

  Row i may attend key j when both belong to the same non-padding segment and
  either j <= i (causal, by row index) or token j is bidirectional (GLM Part A,
  prefix-LM inputs): `glmjax.model.batch.may_attend` on the row indices.
  """
  seg = jnp.asarray(segment_ids)
  bidi = jnp.asarray(bidirectional)
  idx = jnp.arange(seg.shape[-1])
  return may_attend(seg[:, :, None], seg[:, None, :], bidi[:, None, :], idx[None, :, None],
                    idx[None, None, :])


def alibi_bias(alibi_slopes, length):
  """ALiBi bias [heads, lq, lk] = slope_h * (j - i).

  BLOOM adds slope * j; the two differ by a per-row constant that softmax
  ignores, and (j - i) does not depend on where a packed segment starts.
  """
  idx = jnp.arange(length, dtype=jnp.float32)
  rel = idx[None, :] - idx[:, None]
  return jnp.asarray(alibi_slopes, jnp.float32)[:, None, None] * rel[None]


def masked_attention(q, k, v, *, mask, bias=None, scale=None):
  """Softmax attention under an explicit boolean mask, float32 softmax, GQA by grouping.

  Shapes: q [b, lq, heads, d], k/v [b, lk, kv_heads, d], mask [b, lq, lk],
  bias broadcastable to [b, heads, lq, lk] (float32). Rows with no visible
  key return zeros. Returns [b, lq, heads, d] in q.dtype.
  """
  batch, q_length, num_heads, head_dim = q.shape
  k_length, num_kv_heads = k.shape[1], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  q_BLKGD = q.reshape(batch, q_length, num_kv_heads, group, head_dim)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q_BLKGD, k, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], num_heads, q_length, k_length))
    scores = scores + bias.reshape(bias.shape[0], num_kv_heads, group, q_length, k_length)
  mask = mask[:, None, None]  # [b,1,1,q,s]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  unnorm = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(unnorm, axis=-1, keepdims=True)
  probs = unnorm / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_length, num_heads, head_dim).astype(q.dtype)


def attention_reference(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, scale=None):
  """Masked softmax attention, float32 softmax, GQA by grouping query heads.

  Shapes: q [b, lq, heads, d], k/v [b, lk, kv_heads, d], segment_ids and
  bidirectional [b, l] (lq == lk == l). Returns [b, lq, heads, d] in q.dtype.
  Rows with no visible key (padding) return zeros.
  """
  length = q.shape[1]
  if k.shape[1] != length:
    raise ValueError(f"attention_reference needs lq == lk, got {q.shape=} {k.shape=}")
  bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, length)[None]
  return masked_attention(q, k, v, mask=attention_mask(segment_ids, bidirectional), bias=bias,
                          scale=scale)
