"""Flash attention kernels in the TPU (Mosaic) style: the key loop is a grid axis.

The grid walks (batch, head, query block, step) with the step axis marked
"arbitrary" so Mosaic keeps the softmax state in VMEM scratch across steps.
Block skipping uses scalar-prefetched tables (`start`, `count` from
glmjax.pallas.blocks): step n reads key block start + n; steps past `count`
compute nothing and map to the same block as the previous step, so Mosaic
issues no new DMA for them. The dk/dv kernel walks (batch, kv head, key block,
query head in group, step), so grouped query heads accumulate into one kv
head's gradient without repeating k or v in memory.

Layouts (all padded by glmjax.pallas.flash): q/do/o [b, heads, L, d],
k/v [b, kv_heads, L, d], per-token rows (segment ids, bidirectional, lse,
delta) [b, 1, L] or [b, heads, 1, L] so blocks are lane-dense (1, block).
Block sizes must be multiples of 128 when compiled for TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glmjax.model.batch import may_attend
from glmjax.pallas import blocks, tile_math

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
MIN_BLOCK = 128


def _clamped_block(start_ref, count_ref, table_index, step):
  """Block index visited at `step`: past the range it repeats the last one (no new DMA)."""
  last_step = jnp.maximum(count_ref[table_index] - 1, 0)
  return start_ref[table_index] + jnp.minimum(step, last_step)


def _row_to_column(row_ref):
  """A (1, n) lane-dense block ref read as an (n, 1) column."""
  return jnp.expand_dims(row_ref[0], -1)


def _column_to_row(column):
  """(n, 1) -> (1, n) by a masked sublane reduction (no transpose needed)."""
  n = column.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, column, 0.0), axis=0, keepdims=True)


def _tile_positions(q_block, k_block, block_q, block_k):
  q_pos = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_pos = k_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return q_pos, k_pos


def _tile_scores(q, k, q_seg_ref, k_seg_ref, k_bidi_ref, slope, q_block, k_block, *, scale):
  """Masked scores of one tile and its visibility, from the refs of that tile."""
  block_q, block_k = q.shape[0], k.shape[0]
  q_pos, k_pos = _tile_positions(q_block, k_block, block_q, block_k)
  visible = may_attend(_row_to_column(q_seg_ref), k_seg_ref[...], k_bidi_ref[...], q_pos, k_pos)
  s = tile_math.masked_scores(q, k, scale=scale, visible=visible, q_pos=q_pos, k_pos=k_pos,
                              alibi_slope=slope)
  return s, visible, q_pos, k_pos


def _forward_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, k_bidi_ref,
                    *refs, scale, num_q_blocks, has_alibi):
  slopes_ref, refs = (refs[0], refs[1:]) if has_alibi else (None, refs)
  o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs
  b, h, q_block, step = (pl.program_id(axis) for axis in range(4))
  table_index = b * num_q_blocks + q_block

  @pl.when(step == 0)
  def _init():
    m_i, l_i, acc = tile_math.initial_state(*acc_scratch.shape)
    m_scratch[...], l_scratch[...], acc_scratch[...] = m_i, l_i, acc

  @pl.when(step < count_ref[table_index])
  def _visit():
    k_block = start_ref[table_index] + step
    slope = slopes_ref[h] if has_alibi else None
    s, visible, _, _ = _tile_scores(q_ref[...], k_ref[...], q_seg_ref, k_seg_ref, k_bidi_ref, slope,
                                    q_block, k_block, scale=scale)
    m_i, l_i, acc = tile_math.online_softmax_step(m_scratch[...], l_scratch[...], acc_scratch[...],
                                                  s, visible, v_ref[...])
    m_scratch[...], l_scratch[...], acc_scratch[...] = m_i, l_i, acc

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    out, lse = tile_math.finalize(m_scratch[...], l_scratch[...], acc_scratch[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = _column_to_row(lse)


def _dq_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               k_seg_ref, k_bidi_ref, *refs, scale, num_q_blocks, has_alibi):
  if has_alibi:
    slopes_ref, dq_ref, dslope_ref, dq_scratch = refs
  else:
    (dq_ref, dq_scratch), slopes_ref, dslope_ref = refs, None, None
  b, h, q_block, step = (pl.program_id(axis) for axis in range(4))
  table_index = b * num_q_blocks + q_block

  @pl.when(step == 0)
  def _init():
    dq_scratch[...] = jnp.zeros_like(dq_scratch)
    if has_alibi:
      dslope_ref[...] = jnp.zeros_like(dslope_ref)

  @pl.when(step < count_ref[table_index])
  def _visit():
    k_block = start_ref[table_index] + step
    slope = slopes_ref[h] if has_alibi else None
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    s, visible, q_pos, k_pos = _tile_scores(q_ref[...], k, q_seg_ref, k_seg_ref, k_bidi_ref, slope,
                                            q_block, k_block, scale=scale)
    p = tile_math.probabilities(s, visible, _row_to_column(lse_ref))
    dp = tile_math.dot_nt(do, v)
    ds = tile_math.score_gradient(p, dp, _row_to_column(delta_ref))
    dq_scratch[...] += tile_math.dot_nn(ds.astype(k.dtype), k) * scale
    if has_alibi:
      terms = tile_math.alibi_slope_gradient_terms(ds, q_pos, k_pos)
      dslope_ref[...] += jnp.sum(terms, axis=0, keepdims=True)

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                k_seg_ref, k_bidi_ref, *refs, scale, num_k_blocks, group, has_alibi):
  slopes_ref, refs = (refs[0], refs[1:]) if has_alibi else (None, refs)
  dk_ref, dv_ref, dk_scratch, dv_scratch = refs
  b, kv_head, k_block, member, step = (pl.program_id(axis) for axis in range(5))
  table_index = b * num_k_blocks + k_block
  first = (member == 0) & (step == 0)
  last = (member == group - 1) & (step == pl.num_programs(4) - 1)

  @pl.when(first)
  def _init():
    dk_scratch[...] = jnp.zeros_like(dk_scratch)
    dv_scratch[...] = jnp.zeros_like(dv_scratch)

  @pl.when(step < count_ref[table_index])
  def _visit():
    q_block = start_ref[table_index] + step
    slope = slopes_ref[kv_head * group + member] if has_alibi else None
    q, v, do = q_ref[...], v_ref[...], do_ref[...]
    s, visible, _, _ = _tile_scores(q, k_ref[...], q_seg_ref, k_seg_ref, k_bidi_ref, slope, q_block,
                                    k_block, scale=scale)
    p = tile_math.probabilities(s, visible, _row_to_column(lse_ref))
    dv_scratch[...] += tile_math.dot_tn(p.astype(do.dtype), do)
    dp = tile_math.dot_nt(do, v)
    ds = tile_math.score_gradient(p, dp, _row_to_column(delta_ref))
    dk_scratch[...] += tile_math.dot_tn(ds.astype(q.dtype), q) * scale

  @pl.when(last)
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _compiler_params(num_parallel, num_arbitrary):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def forward(q, k, v, segment_ids, bidirectional, slopes, *, scale, block_q, block_k, interpret):
  """Returns o [b, h, L, d] in q.dtype and lse [b, h, L] float32; inputs padded to the blocks."""
  batch, num_heads, length, head_dim = q.shape
  group = num_heads // k.shape[1]
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  start, count = blocks.kv_ranges_per_q_block(segment_ids, bidirectional, block_q, block_k)

  def q_map(b, h, i, n, start_ref, count_ref):
    return b, h, i, 0

  def kv_map(b, h, i, n, start_ref, count_ref):
    return b, lax.div(h, group), _clamped_block(start_ref, count_ref, b * num_q_blocks + i, n), 0

  def q_row_map(b, h, i, n, start_ref, count_ref):
    return b, 0, i

  def k_row_map(b, h, i, n, start_ref, count_ref):
    return b, 0, _clamped_block(start_ref, count_ref, b * num_q_blocks + i, n)

  def lse_map(b, h, i, n, start_ref, count_ref):
    return b, h, 0, i

  in_specs = [
      pl.BlockSpec((None, None, block_q, head_dim), q_map),
      pl.BlockSpec((None, None, block_k, head_dim), kv_map),
      pl.BlockSpec((None, None, block_k, head_dim), kv_map),
      pl.BlockSpec((None, 1, block_q), q_row_map),
      pl.BlockSpec((None, 1, block_k), k_row_map),
      pl.BlockSpec((None, 1, block_k), k_row_map),
  ]
  operands = [q, k, v, segment_ids[:, None], segment_ids[:, None], bidirectional[:, None]]
  if slopes is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    operands.append(slopes)
  kernel = functools.partial(_forward_kernel, scale=scale, num_q_blocks=num_q_blocks,
                             has_alibi=slopes is not None)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_heads, num_q_blocks, num_k_blocks),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, block_q, head_dim), q_map),
                     pl.BlockSpec((None, None, 1, block_q), lse_map)],
          scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, 1, length), jnp.float32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="glm_flash_forward",
  )(start.reshape(-1), count.reshape(-1), *operands)
  return o, lse[:, :, 0]


def _dq(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
        interpret):
  batch, num_heads, length, head_dim = q.shape
  group = num_heads // k.shape[1]
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  start, count = blocks.kv_ranges_per_q_block(segment_ids, bidirectional, block_q, block_k)

  def q_map(b, h, i, n, start_ref, count_ref):
    return b, h, i, 0

  def kv_map(b, h, i, n, start_ref, count_ref):
    return b, lax.div(h, group), _clamped_block(start_ref, count_ref, b * num_q_blocks + i, n), 0

  def head_row_map(b, h, i, n, start_ref, count_ref):
    return b, h, 0, i

  def q_row_map(b, h, i, n, start_ref, count_ref):
    return b, 0, i

  def k_row_map(b, h, i, n, start_ref, count_ref):
    return b, 0, _clamped_block(start_ref, count_ref, b * num_q_blocks + i, n)

  def dslope_map(b, h, i, n, start_ref, count_ref):
    return b, h, i, 0, 0

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_map)
  head_row_spec = pl.BlockSpec((None, None, 1, block_q), head_row_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, head_row_spec, head_row_spec,
              pl.BlockSpec((None, 1, block_q), q_row_map),
              pl.BlockSpec((None, 1, block_k), k_row_map),
              pl.BlockSpec((None, 1, block_k), k_row_map)]
  operands = [q, k, v, do, lse[:, :, None], delta[:, :, None], segment_ids[:, None],
              segment_ids[:, None], bidirectional[:, None]]
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if slopes is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    operands.append(slopes)
    out_specs.append(pl.BlockSpec((None, None, None, 1, block_k), dslope_map))
    out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, num_q_blocks, 1, block_k), jnp.float32))
  kernel = functools.partial(_dq_kernel, scale=scale, num_q_blocks=num_q_blocks,
                             has_alibi=slopes is not None)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_heads, num_q_blocks, num_k_blocks),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="glm_flash_dq",
  )(start.reshape(-1), count.reshape(-1), *operands)
  dslopes = jnp.sum(outs[1], axis=(0, 2, 3, 4)) if slopes is not None else None
  return outs[0], dslopes


def _dkv(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
         interpret):
  batch, num_heads, length, head_dim = q.shape
  num_kv_heads = k.shape[1]
  group = num_heads // num_kv_heads
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  start, count = blocks.q_ranges_per_kv_block(segment_ids, bidirectional, block_q, block_k)

  def q_block(start_ref, count_ref, b, j, n):
    return _clamped_block(start_ref, count_ref, b * num_k_blocks + j, n)

  def q_map(b, kh, j, g, n, start_ref, count_ref):
    return b, kh * group + g, q_block(start_ref, count_ref, b, j, n), 0

  def kv_map(b, kh, j, g, n, start_ref, count_ref):
    return b, kh, j, 0

  def head_row_map(b, kh, j, g, n, start_ref, count_ref):
    return b, kh * group + g, 0, q_block(start_ref, count_ref, b, j, n)

  def q_row_map(b, kh, j, g, n, start_ref, count_ref):
    return b, 0, q_block(start_ref, count_ref, b, j, n)

  def k_row_map(b, kh, j, g, n, start_ref, count_ref):
    return b, 0, j

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_map)
  head_row_spec = pl.BlockSpec((None, None, 1, block_q), head_row_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, head_row_spec, head_row_spec,
              pl.BlockSpec((None, 1, block_q), q_row_map),
              pl.BlockSpec((None, 1, block_k), k_row_map),
              pl.BlockSpec((None, 1, block_k), k_row_map)]
  operands = [q, k, v, do, lse[:, :, None], delta[:, :, None], segment_ids[:, None],
              segment_ids[:, None], bidirectional[:, None]]
  if slopes is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    operands.append(slopes)
  kernel = functools.partial(_dkv_kernel, scale=scale, num_k_blocks=num_k_blocks, group=group,
                             has_alibi=slopes is not None)
  dk, dv = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_kv_heads, num_k_blocks, group, num_q_blocks),
          in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                          pltpu.VMEM((block_k, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(3, 2),
      interpret=interpret,
      name="glm_flash_dkv",
  )(start.reshape(-1), count.reshape(-1), *operands)
  return dk, dv


def backward(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
             interpret):
  """Returns dq, dk, dv (input dtypes) and dslopes ([h] float32 or None)."""
  args = (q, k, v, do, lse, delta, segment_ids, bidirectional, slopes)
  options = dict(scale=scale, block_q=block_q, block_k=block_k, interpret=interpret)
  dq, dslopes = _dq(*args, **options)
  dk, dv = _dkv(*args, **options)
  return dq, dk, dv, dslopes
