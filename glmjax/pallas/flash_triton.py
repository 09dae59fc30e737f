"""Flash attention kernels in the GPU (Triton) style: the key loop runs inside the kernel.

Triton programs cannot carry state across grid steps, so each program owns one
output tile and loops over the blocks it needs: forward and dq over key blocks
`start .. start + count` of its query block; dk/dv over (query head of the
group, query block) pairs of its key block, so grouped heads accumulate into
one kv head's gradient without repeating k or v. The ranges come from
glmjax.pallas.blocks and are read as scalars from the tables in memory.

Layouts (padded by glmjax.pallas.flash): q/do/o [b, heads, L, d],
k/v [b, kv_heads, L, d], segment ids / bidirectional [b, L], lse / delta
[b, heads, L]. Block sizes and head_dim must be powers of two (Triton tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from glmjax.model.batch import may_attend
from glmjax.pallas import blocks, tile_math

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_BLOCK = 16
NUM_WARPS = 4
NUM_STAGES = 2


def _whole(x):
  """A BlockSpec covering all of `x` (tables read with scalar loads)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _span(block_index, block):
  return pl.ds(pl.multiple_of(block_index * block, block), block)


def _positions(block_index, block):
  return block_index * block + jnp.arange(block, dtype=jnp.int32)


def _compiler_params():
  return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _forward_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, k_bidi_ref,
                    *refs, scale, block_k, num_q_blocks, has_alibi):
  slopes_ref, (o_ref, lse_ref) = (refs[0], refs[1:]) if has_alibi else (None, refs)
  b, h, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  table_index = b * num_q_blocks + q_block
  start = start_ref[table_index]
  q = q_ref[...]
  block_q, head_dim = q.shape
  q_pos = _positions(q_block, block_q)[:, None]
  q_seg = q_seg_ref[...][:, None]
  slope = slopes_ref[h] if has_alibi else None

  def visit(k_block, state):
    span = _span(k_block, block_k)
    k_pos = _positions(k_block, block_k)[None, :]
    visible = may_attend(q_seg, k_seg_ref[span][None, :], k_bidi_ref[span][None, :], q_pos, k_pos)
    s = tile_math.masked_scores(q, k_ref[span, :], scale=scale, visible=visible, q_pos=q_pos,
                                k_pos=k_pos, alibi_slope=slope)
    return tile_math.online_softmax_step(*state, s, visible, v_ref[span, :])

  state = lax.fori_loop(start, start + count_ref[table_index], visit,
                        tile_math.initial_state(block_q, head_dim))
  out, lse = tile_math.finalize(*state)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               k_seg_ref, k_bidi_ref, *refs, scale, block_k, num_q_blocks, has_alibi):
  if has_alibi:
    slopes_ref, dq_ref, dslope_ref = refs
  else:
    (dq_ref,), slopes_ref, dslope_ref = refs, None, None
  b, h, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  table_index = b * num_q_blocks + q_block
  start = start_ref[table_index]
  q, do = q_ref[...], do_ref[...]
  block_q, head_dim = q.shape
  q_pos = _positions(q_block, block_q)[:, None]
  q_seg = q_seg_ref[...][:, None]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  slope = slopes_ref[h] if has_alibi else None

  def visit(k_block, state):
    dq, dslope = state
    span = _span(k_block, block_k)
    k_pos = _positions(k_block, block_k)[None, :]
    k = k_ref[span, :]
    visible = may_attend(q_seg, k_seg_ref[span][None, :], k_bidi_ref[span][None, :], q_pos, k_pos)
    s = tile_math.masked_scores(q, k, scale=scale, visible=visible, q_pos=q_pos, k_pos=k_pos,
                                alibi_slope=slope)
    p = tile_math.probabilities(s, visible, lse)
    ds = tile_math.score_gradient(p, tile_math.dot_nt(do, v_ref[span, :]), delta)
    dq = dq + tile_math.dot_nn(ds.astype(k.dtype), k) * scale
    if has_alibi:
      dslope = dslope + jnp.sum(tile_math.alibi_slope_gradient_terms(ds, q_pos, k_pos), axis=1)
    return dq, dslope

  initial = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.zeros((block_q,), jnp.float32))
  dq, dslope = lax.fori_loop(start, start + count_ref[table_index], visit, initial)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if has_alibi:
    dslope_ref[...] = dslope


def _dkv_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                k_seg_ref, k_bidi_ref, *refs, scale, block_q, num_k_blocks, group, length,
                has_alibi):
  slopes_ref, (dk_ref, dv_ref) = (refs[0], refs[1:]) if has_alibi else (None, refs)
  b, kv_head, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  table_index = b * num_k_blocks + k_block
  start, count = start_ref[table_index], count_ref[table_index]
  k, v = k_ref[...], v_ref[...]
  block_k, head_dim = k.shape
  k_pos = _positions(k_block, block_k)[None, :]
  k_seg, k_bidi = k_seg_ref[...][None, :], k_bidi_ref[...][None, :]
  blocks_per_member = jnp.maximum(count, 1)

  def visit(step, state):
    dk, dv = state
    member = lax.div(step, blocks_per_member)
    q_block = start + lax.rem(step, blocks_per_member)
    rows = pl.ds(pl.multiple_of(member * length + q_block * block_q, block_q), block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_pos = _positions(q_block, block_q)[:, None]
    visible = may_attend(q_seg_ref[_span(q_block, block_q)][:, None], k_seg, k_bidi, q_pos, k_pos)
    slope = slopes_ref[kv_head * group + member] if has_alibi else None
    s = tile_math.masked_scores(q, k, scale=scale, visible=visible, q_pos=q_pos, k_pos=k_pos,
                                alibi_slope=slope)
    p = tile_math.probabilities(s, visible, lse_ref[rows][:, None])
    dv = dv + tile_math.dot_tn(p.astype(do.dtype), do)
    ds = tile_math.score_gradient(p, tile_math.dot_nt(do, v), delta_ref[rows][:, None])
    dk = dk + tile_math.dot_tn(ds.astype(q.dtype), q) * scale
    return dk, dv

  initial = (jnp.zeros((block_k, head_dim), jnp.float32), jnp.zeros((block_k, head_dim), jnp.float32))
  dk, dv = lax.fori_loop(0, group * count, visit, initial)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def forward(q, k, v, segment_ids, bidirectional, slopes, *, scale, block_q, block_k, interpret):
  """Returns o [b, h, L, d] in q.dtype and lse [b, h, L] float32; inputs padded to the blocks."""
  batch, num_heads, length, head_dim = q.shape
  group = num_heads // k.shape[1]
  num_q_blocks = length // block_q
  start, count = blocks.kv_ranges_per_q_block(segment_ids, bidirectional, block_q, block_k)
  start, count = start.reshape(-1), count.reshape(-1)
  in_specs = [
      _whole(start), _whole(count),
      pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
      pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, lax.div(h, group), 0, 0)),
      pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, lax.div(h, group), 0, 0)),
      pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
      pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
  ]
  operands = [start, count, q, k, v, segment_ids, segment_ids, bidirectional]
  if slopes is not None:
    in_specs.append(_whole(slopes))
    operands.append(slopes)
  kernel = functools.partial(_forward_kernel, scale=scale, block_k=block_k,
                             num_q_blocks=num_q_blocks, has_alibi=slopes is not None)
  return pl.pallas_call(
      kernel,
      grid=(batch, num_heads, num_q_blocks),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="glm_flash_forward",
  )(*operands)


def _dq(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
        interpret):
  batch, num_heads, length, head_dim = q.shape
  group = num_heads // k.shape[1]
  num_q_blocks = length // block_q
  start, count = blocks.kv_ranges_per_q_block(segment_ids, bidirectional, block_q, block_k)
  start, count = start.reshape(-1), count.reshape(-1)
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, lax.div(h, group), 0, 0))
  head_row_spec = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
  in_specs = [_whole(start), _whole(count), q_spec, kv_spec, kv_spec, q_spec, head_row_spec,
              head_row_spec, pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
              pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
              pl.BlockSpec((None, length), lambda b, h, i: (b, 0))]
  operands = [start, count, q, k, v, do, lse, delta, segment_ids, segment_ids, bidirectional]
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if slopes is not None:
    in_specs.append(_whole(slopes))
    operands.append(slopes)
    out_specs.append(head_row_spec)
    out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32))
  kernel = functools.partial(_dq_kernel, scale=scale, block_k=block_k, num_q_blocks=num_q_blocks,
                             has_alibi=slopes is not None)
  outs = pl.pallas_call(
      kernel,
      grid=(batch, num_heads, num_q_blocks),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="glm_flash_dq",
  )(*operands)
  dslopes = jnp.sum(outs[1], axis=(0, 2)) if slopes is not None else None
  return outs[0], dslopes


def _dkv(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
         interpret):
  batch, num_heads, length, head_dim = q.shape
  num_kv_heads = k.shape[1]
  group = num_heads // num_kv_heads
  num_k_blocks = length // block_k
  start, count = blocks.q_ranges_per_kv_block(segment_ids, bidirectional, block_q, block_k)
  start, count = start.reshape(-1), count.reshape(-1)
  grouped_rows = group * length
  group_spec = pl.BlockSpec((None, None, grouped_rows, head_dim), lambda b, kh, j: (b, kh, 0, 0))
  group_row_spec = pl.BlockSpec((None, None, grouped_rows), lambda b, kh, j: (b, kh, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, kh, j: (b, kh, j, 0))
  in_specs = [_whole(start), _whole(count), group_spec, kv_spec, kv_spec, group_spec,
              group_row_spec, group_row_spec,
              pl.BlockSpec((None, length), lambda b, kh, j: (b, 0)),
              pl.BlockSpec((None, block_k), lambda b, kh, j: (b, j)),
              pl.BlockSpec((None, block_k), lambda b, kh, j: (b, j))]

  def by_kv_head(x):
    """[b, heads, L, ...] -> [b, kv_heads, group * L, ...]: each kv head's query rows, contiguous."""
    return x.reshape(batch, num_kv_heads, grouped_rows, *x.shape[3:])

  operands = [start, count, by_kv_head(q), k, v, by_kv_head(do), by_kv_head(lse), by_kv_head(delta),
              segment_ids, segment_ids, bidirectional]
  if slopes is not None:
    in_specs.append(_whole(slopes))
    operands.append(slopes)
  kernel = functools.partial(_dkv_kernel, scale=scale, block_q=block_q, num_k_blocks=num_k_blocks,
                             group=group, length=length, has_alibi=slopes is not None)
  return pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_k_blocks),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="glm_flash_dkv",
  )(*operands)


def backward(q, k, v, do, lse, delta, segment_ids, bidirectional, slopes, *, scale, block_q, block_k,
             interpret):
  """Returns dq, dk, dv (input dtypes) and dslopes ([h] float32 or None)."""
  args = (q, k, v, do, lse, delta, segment_ids, bidirectional, slopes)
  options = dict(scale=scale, block_q=block_q, block_k=block_k, interpret=interpret)
  dq, dslopes = _dq(*args, **options)
  dk, dv = _dkv(*args, **options)
  return dq, dk, dv, dslopes
