"""Block-skip ranges against a brute-force per-tile check of the full reference mask."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from glmjax.pallas import blocks, reference
from tests.pallas import cases


_kv_ranges = jax.jit(blocks.kv_ranges_per_q_block, static_argnums=(2, 3))
_q_ranges = jax.jit(blocks.q_ranges_per_kv_block, static_argnums=(2, 3))


def _tiles_with_visible_pairs(segment_ids, bidirectional, block_q, block_k):
  """[b, nq, nk] bool from the materialised [L, L] mask (the slow, obvious way)."""
  mask = np.asarray(reference.attention_mask(segment_ids, bidirectional))
  batch, length, _ = mask.shape
  tiles = mask.reshape(batch, length // block_q, block_q, length // block_k, block_k)
  return tiles.any(axis=(2, 4))


def _ranges_as_table(start, count, n_inner):
  inner = np.arange(n_inner)
  start, count = np.asarray(start)[..., None], np.asarray(count)[..., None]
  return (inner >= start) & (inner < start + count)


@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_ranges_cover_visible_tiles_exactly_for_contiguous_layouts(layout):
  rng = np.random.default_rng(5)
  block_q, block_k, length = 16, 8, 128
  for _ in range(10):
    segment_ids, bidirectional = cases.packed_batch(rng, 3, length, layout)
    needed = _tiles_with_visible_pairs(segment_ids, bidirectional, block_q, block_k)
    kv_start, kv_count = _kv_ranges(segment_ids, bidirectional, block_q, block_k)
    q_start, q_count = _q_ranges(segment_ids, bidirectional, block_q, block_k)
    by_q = _ranges_as_table(kv_start, kv_count, length // block_k)
    by_k = _ranges_as_table(q_start, q_count, length // block_q).swapaxes(1, 2)
    assert not np.any(needed & ~by_q), "a key range misses a tile with a visible pair"
    assert not np.any(needed & ~by_k), "a query range misses a tile with a visible pair"
    if layout != "scattered":
      np.testing.assert_array_equal(by_q, needed)
      np.testing.assert_array_equal(by_k, needed)


def test_causal_packing_skips_future_and_other_segments():
  """Two causal segments of 64 tokens, blocks of 32: 3 of the 4 diagonal-block tiles per segment."""
  segment_ids = np.repeat(np.array([[1, 2]]), 64, axis=1)
  bidirectional = np.zeros_like(segment_ids)
  start, count = blocks.kv_ranges_per_q_block(segment_ids, bidirectional, 32, 32)
  np.testing.assert_array_equal(np.asarray(start), [[0, 0, 2, 2]])
  np.testing.assert_array_equal(np.asarray(count), [[1, 2, 1, 2]])
