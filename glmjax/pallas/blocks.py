"""Block-level metadata for the tiled kernels: padding and which tiles to visit.

A (query block, key block) tile is visited only if some pair in it may be
visible under the packing + GLM rule (DESIGN.md s.2). The decision is made
per block from O(L) summaries of `segment_ids` and `bidirectional`, never from
an [L, L] mask: the result is a [batch, num_q_blocks, num_k_blocks] table,
then compressed into one contiguous range of blocks per row of tiles.

The test is sound (a tile holding a visible pair is always visited) because a
visible pair (i, j) has seg[i] == seg[j] != 0, so the non-padding segment-id
ranges of the two blocks overlap, and either j <= i (the key block starts no
later than the query block ends) or token j is bidirectional (its segment id
falls in the key block's range of bidirectional segment ids). Kernels still
apply the exact mask inside every visited tile.
"""

from __future__ import annotations

import jax.numpy as jnp

_EMPTY_MIN = jnp.iinfo(jnp.int32).max


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def next_power_of_2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def pad_axis(x, axis: int, size: int, value=0):
  """Pads `x` with `value` at the end of `axis` up to `size`."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _segment_range(segment_ids, keep, block: int):
  """Min and max of segment ids where `keep`, per block: two [batch, n_blocks]."""
  batch, length = segment_ids.shape
  seg = segment_ids.reshape(batch, length // block, block)
  keep = keep.reshape(batch, length // block, block)
  seg_min = jnp.min(jnp.where(keep, seg, _EMPTY_MIN), axis=-1)
  seg_max = jnp.max(jnp.where(keep, seg, 0), axis=-1)
  return seg_min, seg_max


def _overlap(a_min, a_max, b_min, b_max):
  """Whether [a_min, a_max] and [b_min, b_max] intersect, broadcast [b, nq, 1] x [b, 1, nk]."""
  return (a_min <= b_max) & (b_min <= a_max)


def visible_blocks(segment_ids, bidirectional, block_q: int, block_k: int):
  """Bool [batch, length // block_q, length // block_k]: tiles that may hold a visible pair.

  `segment_ids` and `bidirectional` are [batch, length] with length a multiple
  of both block sizes (pad with segment 0 first).
  """
  segment_ids = segment_ids.astype(jnp.int32)
  real = segment_ids != 0
  bidi = real & (bidirectional != 0)
  length = segment_ids.shape[1]
  q_min, q_max = _segment_range(segment_ids, real, block_q)
  k_min, k_max = _segment_range(segment_ids, real, block_k)
  kb_min, kb_max = _segment_range(segment_ids, bidi, block_k)
  q_last_row = jnp.arange(block_q - 1, length, block_q)
  k_first_col = jnp.arange(0, length, block_k)
  causal_reach = (k_first_col[None, :] <= q_last_row[:, None])[None]
  same_segment = _overlap(q_min[:, :, None], q_max[:, :, None], k_min[:, None, :], k_max[:, None, :])
  bidi_reach = _overlap(q_min[:, :, None], q_max[:, :, None], kb_min[:, None, :], kb_max[:, None, :])
  return same_segment & (causal_reach | bidi_reach)


def block_ranges(visible):
  """Compresses a [batch, n_outer, n_inner] table to the inner range to visit.

  Returns `start` and `count`, int32 [batch, n_outer]: blocks start..start+count-1
  cover every visible inner block (count 0 where none is visible). For packed
  contiguous segments the range is exact; otherwise it is a superset and the
  in-tile mask does the rest.
  """
  n_inner = visible.shape[-1]
  any_visible = jnp.any(visible, axis=-1)
  first = jnp.argmax(visible, axis=-1)
  last = n_inner - 1 - jnp.argmax(visible[..., ::-1], axis=-1)
  start = jnp.where(any_visible, first, 0).astype(jnp.int32)
  count = jnp.where(any_visible, last - first + 1, 0).astype(jnp.int32)
  return start, count


def kv_ranges_per_q_block(segment_ids, bidirectional, block_q: int, block_k: int):
  """Key-block ranges for each query block (forward and dq kernels)."""
  return block_ranges(visible_blocks(segment_ids, bidirectional, block_q, block_k))


def q_ranges_per_kv_block(segment_ids, bidirectional, block_q: int, block_k: int):
  """Query-block ranges for each key block (dk/dv kernel)."""
  visible = visible_blocks(segment_ids, bidirectional, block_q, block_k)
  return block_ranges(jnp.swapaxes(visible, 1, 2))
