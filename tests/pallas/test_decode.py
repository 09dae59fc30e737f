"""decode_attention equals the full reference evaluated at the queries' cache slots."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from glmjax.pallas import reference, segment_ids_from_lengths
from glmjax.pallas import decode_attention as _decode_attention
from tests.pallas import cases


def _reference_rows(q_full, k, v, segment_ids, bidirectional, slopes, slots_BQ):
  out = jax.jit(reference.attention_reference)(q_full, k, v, segment_ids=segment_ids,
                                               bidirectional=bidirectional, alibi_slopes=slopes)
  return np.take_along_axis(np.asarray(out), np.asarray(slots_BQ)[:, :, None, None], axis=1)


decode_attention = jax.jit(_decode_attention)


def _queries_in_slots(q_full, slots_BQ):
  return jnp.take_along_axis(q_full, jnp.asarray(slots_BQ)[:, :, None, None], axis=1)


def test_shared_write_index_with_left_padding_prefix_and_alibi():
  rng = np.random.default_rng(1)
  batch, cache_length, heads, kv_heads, head_dim, new = 2, 48, 8, 2, 16, 3
  segment_ids = np.zeros((batch, cache_length), np.int32)
  bidirectional = np.zeros_like(segment_ids)
  segment_ids[0, :40], bidirectional[0, :12] = 1, 1  # prompt of 12 (Part A) + generated
  segment_ids[1, 9:40], bidirectional[1, 9:20] = 1, 1  # left-padded shorter prompt
  q_full, k, v = cases.qkv(rng, batch, cache_length, heads, kv_heads, head_dim, jnp.float32)
  slopes = cases.alibi_slopes(heads)
  slots = np.arange(40 - new, 40)
  slots_BQ = np.broadcast_to(slots, (batch, new))
  actual = decode_attention(_queries_in_slots(q_full, slots_BQ), k, v, query_slots=slots,
                            query_segment_ids=segment_ids[:, slots], key_segment_ids=segment_ids,
                            key_bidirectional=bidirectional, alibi_slopes=slopes)
  expected = _reference_rows(q_full, k, v, segment_ids, bidirectional, slopes, slots_BQ)
  cases.assert_close(actual, expected, tolerance=1e-5, name="decode")


def test_per_row_lengths_one_new_token_mqa():
  rng = np.random.default_rng(2)
  batch, cache_length, heads, head_dim = 3, 64, 4, 32
  lengths = np.array([5, 64, 33])
  segment_ids = np.asarray(segment_ids_from_lengths(lengths, cache_length))
  np.testing.assert_array_equal(segment_ids.sum(axis=1), lengths)
  bidirectional = np.zeros_like(segment_ids)
  q_full, k, v = cases.qkv(rng, batch, cache_length, heads, 1, head_dim, jnp.bfloat16)
  slots_BQ = (lengths - 1)[:, None]
  actual = decode_attention(_queries_in_slots(q_full, slots_BQ), k, v, query_slots=slots_BQ,
                            query_segment_ids=np.ones((batch, 1), np.int32),
                            key_segment_ids=segment_ids, key_bidirectional=bidirectional)
  expected = _reference_rows(q_full, k, v, segment_ids, bidirectional, None, slots_BQ)
  assert actual.dtype == jnp.bfloat16
  cases.assert_close(actual, expected, tolerance=1e-2, name="decode")
