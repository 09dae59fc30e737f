"""Context (sequence) parallelism: ring attention over the `context` mesh axis.

With the logical axis `length` mapped to the mesh axis `context` (glmjax.sharding
DEFAULT_RULES), every activation [batch, length, ...] is split along the sequence, so norms,
MLP and loss run on each device's chunk. Attention is the one op that mixes positions:

  ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): under
  `shard_map` each device keeps its query chunk and passes its key / value chunk (with the
  keys' segment ids, bidirectional flags) to the next device with `ppermute`, c - 1 times for
  c devices. Each step scores the local queries against the visiting chunk under the packing
  + GLM rule `may_attend` on *global* row indices, and folds the block into a running
  (max m, sum l, output o) -- the online softmax (Milakov & Gimelshein 2018; FlashAttention,
  Dao et al. 2022, eq. in sec. 3.1): m' = max(m, m_b), l' = l e^(m - m') + l_b e^(m_b - m'),
  o' = o e^(m - m') + o_b e^(m_b - m'); the output is o / l. Blocks with no visible pair are
  skipped (`lax.cond`). ALiBi adds slope * (j - i) on global indices; GQA groups query heads
  as glmjax.pallas.reference. The backward (custom VJP) is a second trip around the ring:
  only q, k, v, the output and the row log-sum-exp are kept from the forward; each block's
  probabilities are recomputed as e^(s - lse) (FlashAttention-2's backward, Dao 2023), dq
  accumulates locally and each key chunk's dk / dv travel with it, c hops, back to its owner;
  memory per device is O(L / c) plus one block.

Causal load balancing (zig-zag, as Megatron-LM's context parallelism / Brandon et al. 2023
"Striped Attention" for the idea): the sequence is cut into 2c chunks and device r holds
chunks r and 2c - 1 - r, so every device has as much causally visible work. The model
permutes its batch into that order before the first layer (`to_zigzag`) and back before the
head (`from_zigzag`); every op but attention is per token, and attention uses the original
row indices, so the function computed is unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import spmd
from jax.sharding import PartitionSpec as P

from glmjax.model.batch import may_attend
from glmjax.pallas.partitioning import mesh_axes

CONTEXT_AXIS = "context"
F32 = jnp.float32
NEG = -1e30  # running max of a row that has seen no key: finite, so e^(m - m') never makes NaN
DEFAULT_BLOCK_K = 512  # key tile of the XLA blocks
BIG = 1e30  # log-sum-exp of a row with no visible key: e^(s - BIG) = 0 in the backward


def context_size() -> int:
  """Size of the `context` mesh axis when the active rules split `length` over it, else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or not rules:
    return 1
  if CONTEXT_AXIS not in mesh_axes("length", rules):
    return 1
  return int(mesh.shape[CONTEXT_AXIS])


def check_length(length: int, context: int) -> None:
  """Zig-zag needs 2 * context chunks of equal size: one-line ValueError otherwise."""
  if length % (2 * context):
    raise ValueError(f"MeshConfig.context={context}: the sequence length {length} must be a multiple "
                     f"of 2 x context = {2 * context} (zig-zag chunks); pad the sequences or change "
                     "MeshConfig.context")


def zigzag_order(length: int, context: int) -> np.ndarray:
  """Original row indices in zig-zag storage order: device r's rows are chunks r, 2c-1-r."""
  chunk = length // (2 * context)
  chunks = [c for r in range(context) for c in (r, 2 * context - 1 - r)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def to_zigzag(x, context: int):
  """[batch, length, ...] in zig-zag order (identity for context 1)."""
  if context <= 1:
    return x
  return jnp.take(x, jnp.asarray(zigzag_order(x.shape[1], context)), axis=1)


def from_zigzag(x, context: int):
  """Inverse of `to_zigzag`."""
  if context <= 1:
    return x
  return jnp.take(x, jnp.asarray(np.argsort(zigzag_order(x.shape[1], context))), axis=1)


def _local_index(shard, local_length: int, context: int):
  """Original row indices [n] of device `shard`'s rows (its two zig-zag chunks)."""
  half = local_length // 2
  first = shard * half + jnp.arange(half)
  second = (2 * context - 1 - shard) * half + jnp.arange(half)
  return jnp.concatenate([first, second]).astype(jnp.int32)


def _visible(q_seg, q_idx, k_seg, k_bidi, k_idx):
  """The packing + GLM rule on global row indices: [b, n, m]."""
  return may_attend(q_seg[:, :, None], k_seg[:, None, :], k_bidi[:, None, :], q_idx[None, :, None],
                    k_idx[None, None, :])


def _block_xla(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale):
  """One (query chunk, key chunk) block: (o [b,n,K,G,d] unnormalised, m, l [b,K,G,n]) in f32."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q5, k, preferred_element_type=F32) * scale
  if slopes5 is not None:
    rel = (k_idx[None, :] - q_idx[:, None]).astype(F32)
    s = s + slopes5 * rel[None, None, None]
  visible = _visible(q_seg, q_idx, k_seg, k_bidi, k_idx)[:, None, None]
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, NEG))
  p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
  o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=F32)
  return o, m, jnp.sum(p, axis=-1)


# Each tile checkpointed: inside the model's layer `scan` the compiled train step kept every
# (ring step, key tile) score block of the forward, stacked, although the custom ring backward
# is the one that runs (checked by perturbing it); cause not found. With the checkpoint only a
# tile's inputs are kept (25.7 -> 1.6 GiB per device at 64K, benchmarks/long_context.py).
_block_xla_remat = jax.checkpoint(_block_xla, static_argnums=(9,),
                                  policy=jax.checkpoint_policies.nothing_saveable)


# --- The block as a Pallas kernel (impl="pallas") ---------------------------------------------

def _block_kernel(q_ref, k_ref, v_ref, q_seg_ref, q_idx_ref, k_seg_ref, k_bidi_ref, k_idx_ref,
                  *refs, scale, has_alibi):
  """One (batch, kv head) program: rows are the G query heads' n queries, g-major."""
  slope_ref, (o_ref, m_ref, l_ref) = (refs[0], refs[1:]) if has_alibi else (None, refs)
  q_idx, k_idx = q_idx_ref[...][:, None], k_idx_ref[...][None, :]
  s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=F32) * scale
  if has_alibi:
    s = s + slope_ref[...][:, None] * (k_idx - q_idx).astype(F32)
  visible = may_attend(q_seg_ref[...][:, None], k_seg_ref[...][None, :], k_bidi_ref[...][None, :],
                       q_idx, k_idx)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(m > NEG, m, NEG)
  p = jnp.where(visible, jnp.exp(s - m[:, None]), 0.0)
  o_ref[...] = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=F32)
  m_ref[...] = m
  l_ref[...] = jnp.sum(p, axis=-1)


def _block_pallas_forward(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  b, n, kv, g, d = q5.shape
  m_len, rows = k.shape[1], g * n
  qh = jnp.transpose(q5, (0, 2, 3, 1, 4)).reshape(b, kv, rows, d)
  kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
  operands = [qh, kh, vh, jnp.tile(q_seg, (1, g)), jnp.tile(q_idx, g), k_seg, k_bidi, k_idx]
  in_specs = [pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0)),
              pl.BlockSpec((None, None, m_len, d), lambda i, j: (i, j, 0, 0)),
              pl.BlockSpec((None, None, m_len, d), lambda i, j: (i, j, 0, 0)),
              pl.BlockSpec((None, rows), lambda i, j: (i, 0)),
              pl.BlockSpec((rows,), lambda i, j: (0,)),
              pl.BlockSpec((None, m_len), lambda i, j: (i, 0)),
              pl.BlockSpec((None, m_len), lambda i, j: (i, 0)),
              pl.BlockSpec((m_len,), lambda i, j: (0,))]
  if slopes5 is not None:
    operands.append(jnp.repeat(slopes5.reshape(kv, g), n, axis=1))  # [K, G*n]
    in_specs.append(pl.BlockSpec((None, rows), lambda i, j: (j, 0)))
  o, m, l = pl.pallas_call(
      functools.partial(_block_kernel, scale=scale, has_alibi=slopes5 is not None),
      grid=(b, kv), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0)),
                 pl.BlockSpec((None, None, rows), lambda i, j: (i, j, 0)),
                 pl.BlockSpec((None, None, rows), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kv, rows, d), F32),
                 jax.ShapeDtypeStruct((b, kv, rows), F32), jax.ShapeDtypeStruct((b, kv, rows), F32)],
      interpret=interpret, name="glm_ring_block")(*operands)
  o = jnp.transpose(o.reshape(b, kv, g, n, d), (0, 3, 1, 2, 4))
  return o, m.reshape(b, kv, g, n), l.reshape(b, kv, g, n)


def _skip_if_masked(fn, q_seg, q_idx, k_seg, k_bidi, k_idx, zeros):
  """fn() when some (query, key) pair of the block may attend, else `zeros()` (lax.cond)."""
  return jax.lax.cond(jnp.any(_visible(q_seg, q_idx, k_seg, k_bidi, k_idx)), lambda _: fn(),
                      lambda _: zeros(), None)


def _fold_unless_masked(acc, fn, q_seg, q_idx, k_seg, k_bidi, k_idx):
  """`_combine(acc, fn())` when some (query, key) pair of the block may attend, else `acc`.

  The skip branch passes the running stats through rather than returning a block of zeros: a
  branch whose outputs depend only on the masks is loop-invariant in the model's layer scan, so
  JAX's partial evaluation hoisted it out of the layers and kept its zero (o, m, l) of every
  (ring step, key tile) as a stacked residual, [c, L / (c x block_k), b, L / c, H, d] float32 a
  device (64 GiB at 128K over context 8 on TPU): per-device memory did not fall with context."""
  return jax.lax.cond(jnp.any(_visible(q_seg, q_idx, k_seg, k_bidi, k_idx)),
                      lambda a: _combine(a, fn()), lambda a: a, acc)


def _combine(acc, new):
  """Online softmax: folds a block's (o, m, l) into the running (o, m, l)."""
  (o, m, l), (o_b, m_b, l_b) = acc, new
  m_new = jnp.maximum(m, m_b)
  a, a_b = jnp.exp(m - m_new), jnp.exp(m_b - m_new)
  return o * _to_rows(a) + o_b * _to_rows(a_b), m_new, l * a + l_b * a_b


def _empty_stats(q5):
  b, n, kv, g, d = q5.shape
  return (jnp.zeros((b, n, kv, g, d), F32), jnp.full((b, kv, g, n), NEG, F32),
          jnp.zeros((b, kv, g, n), F32))


def _tile_size(length: int, tile: int) -> int:
  return tile if 0 < tile < length and length % tile == 0 else length


def _key_tile(j, size, *xs):
  """Key tile j (rows j*size ...) of [b, m, ...] arrays and of the [m] index (last)."""
  *arrays, k_idx = xs
  return ([jax.lax.dynamic_slice_in_dim(x, j * size, size, axis=1) for x in arrays]
          + [jax.lax.dynamic_slice_in_dim(k_idx, j * size, size, axis=0)])


def _block(acc, q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret, tile):
  """The running (o, m, l) `acc` with a block folded in: in XLA over key tiles of `tile` rows
  (one tile's scores live at a time, tiles with no visible pair skipped) when `interpret` is
  None, else the Pallas kernel on the whole block (interpret mode or compiled), skipped when
  nothing in it is visible."""
  if interpret is not None:
    fn = lambda: _block_pallas_forward(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5,  # noqa: E731
                                       scale, interpret)
    return _fold_unless_masked(acc, fn, q_seg, q_idx, k_seg, k_bidi, k_idx)
  size = _tile_size(k.shape[1], tile)

  def body(j, acc):
    kt, vt, segt, bidit, idxt = _key_tile(j, size, k, v, k_seg, k_bidi, k_idx)
    fn = lambda: _block_xla_remat(q5, kt, vt, q_seg, q_idx, segt, bidit, idxt, slopes5, scale)  # noqa: E731
    return _fold_unless_masked(acc, fn, q_seg, q_idx, segt, bidit, idxt)

  return jax.lax.fori_loop(0, k.shape[1] // size, body, acc)


def _local_grouped(q, k, slopes, context: int):
  """What forward and backward both start from on one device: the shapes (b, n, heads, d, kv
  heads, group g), this shard's index, its rows' global indices, q as [b, n, kv, g, d] and the
  ALiBi slopes as [1, kv, g, 1, 1] (or None)."""
  b, n, heads, d = q.shape
  kv = k.shape[2]
  g = heads // kv
  shard = jax.lax.axis_index(CONTEXT_AXIS)
  slopes5 = None if slopes is None else slopes.astype(F32).reshape(1, kv, g, 1, 1)
  return (b, n, heads, d, kv, g), shard, _local_index(shard, n, context), q.reshape(b, n, kv, g, d), slopes5


def _ring_forward(q, k, v, seg, bidi, slopes, context: int, scale: float, interpret, tile):
  """Per-device forward under shard_map: local q [b, n, H, d], k/v [b, n, K, d], masks [b, n].
  Returns the output [b, n, H, d] and the row log-sum-exp [b, K, G, n] (BIG for empty rows)."""
  (b, n, heads, d, kv, g), shard, q_idx, q5, slopes5 = _local_grouped(q, k, slopes, context)
  def step(t, carry):  # a loop (not unrolled), so one block's buffers are live at a time
    *stats, visiting = carry
    k_b, v_b, seg_b, bidi_b = visiting
    k_idx = _local_index((shard - t) % context, n, context)
    stats = _block(tuple(stats), q5, k_b, v_b, seg, q_idx, seg_b, bidi_b, k_idx, slopes5, scale,
                   interpret, tile)
    return (*stats, tuple(_pass(x, context) for x in visiting))

  init = (*_empty_stats(q5), (k, v, seg, bidi))
  o, m, l, _ = jax.lax.fori_loop(0, context, step, init)  # c hops: the chunks end at home
  l_rows = _to_rows(l)
  out = jnp.where(l_rows > 0, o / jnp.where(l_rows > 0, l_rows, 1.0), 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), BIG)
  return out.reshape(b, n, heads, d).astype(q.dtype), lse


def _to_rows(x):
  """[b, K, G, n] -> [b, n, K, G, 1]."""
  return jnp.transpose(x, (0, 3, 1, 2))[..., None]


def _pass(x, context: int):
  """One hop around the ring: device i sends to i + 1."""
  return jax.lax.ppermute(x, CONTEXT_AXIS, [(i, (i + 1) % context) for i in range(context)])


def _block_grads(q5, k, v, do5, lse, delta, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale):
  """FlashAttention-2's backward for one block (Dao 2023, alg. 2): p = e^(s - lse),
  dv = p^T do, ds = p (do v^T - delta), dq = ds k scale, dk = ds^T q scale, dslope = sum ds (j - i)."""
  def compute():
    s = jnp.einsum("bqkgd,bskd->bkgqs", q5, k, preferred_element_type=F32) * scale
    rel = (k_idx[None, :] - q_idx[:, None]).astype(F32)
    if slopes5 is not None:
      s = s + slopes5 * rel[None, None, None]
    visible = _visible(q_seg, q_idx, k_seg, k_bidi, k_idx)[:, None, None]
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p, do5, preferred_element_type=F32)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do5, v, preferred_element_type=F32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k, preferred_element_type=F32) * scale
    dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q5, preferred_element_type=F32) * scale
    dslopes = jnp.sum(ds * rel[None, None, None], axis=(0, 3, 4))
    return dq, dk, dv, dslopes

  def skip():
    return (jnp.zeros(q5.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32),
            jnp.zeros(q5.shape[2:4], F32))

  return _skip_if_masked(compute, q_seg, q_idx, k_seg, k_bidi, k_idx, skip)


def _block_grads_tiled(q5, k, v, do5, lse, delta, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale,
                       tile):
  """_block_grads over key tiles: dq and dslopes summed, each tile's dk / dv written in place."""
  size = _tile_size(k.shape[1], tile)

  def body(j, carry):
    dq, dk, dv, dsl = carry
    kt, vt, segt, bidit, idxt = _key_tile(j, size, k, v, k_seg, k_bidi, k_idx)
    ddq, ddk, ddv, ddsl = _block_grads(q5, kt, vt, do5, lse, delta, q_seg, q_idx, segt, bidit, idxt,
                                       slopes5, scale)
    put = lambda x, t: jax.lax.dynamic_update_slice_in_dim(x, t, j * size, axis=1)  # noqa: E731
    return dq + ddq, put(dk, ddk), put(dv, ddv), dsl + ddsl

  init = (jnp.zeros(q5.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32),
          jnp.zeros(q5.shape[2:4], F32))
  return jax.lax.fori_loop(0, k.shape[1] // size, body, init)




def _ring_backward(q, k, v, seg, bidi, slopes, out, lse, d_out, *, context: int, scale: float,
                   tile: int, reduce_axes: tuple):
  """The ring backward: each visiting key chunk carries its dk / dv accumulators around the
  ring, c hops, so they arrive home; only q, k, v, the output and the row lse are kept from
  the forward (O(L / c) per device), every block is recomputed."""
  (b, n, heads, d, kv, g), shard, q_idx, q5, slopes5 = _local_grouped(q, k, slopes, context)
  do5 = d_out.astype(F32).reshape(b, n, kv, g, d)
  delta = jnp.transpose(jnp.sum(do5 * out.astype(F32).reshape(b, n, kv, g, d), axis=-1), (0, 2, 3, 1))
  def step(t, carry):
    dq, dslopes, dk, dv, visiting = carry
    k_b, v_b, seg_b, bidi_b = visiting
    k_idx = _local_index((shard - t) % context, n, context)
    ddq, ddk, ddv, dsl = _block_grads_tiled(q5, k_b, v_b, do5, lse, delta, seg, q_idx, seg_b, bidi_b,
                                            k_idx, slopes5, scale, tile)
    # dk / dv travel with their chunk: after c hops they are back at the owner
    return (dq + ddq, dslopes + dsl, _pass(dk + ddk, context), _pass(dv + ddv, context),
            tuple(_pass(x, context) for x in visiting))

  init = (jnp.zeros(q5.shape, F32), jnp.zeros((kv, g), F32), jnp.zeros(k.shape, F32),
          jnp.zeros(v.shape, F32), (k, v, seg, bidi))
  dq, dslopes, dk, dv, _ = jax.lax.fori_loop(0, context, step, init)
  grads = (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
  if slopes is None:
    return grads
  # a head's slope is shared by every batch / context shard: sum their parts
  return grads + (jax.lax.psum(dslopes.reshape(heads), reduce_axes).astype(slopes.dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q, k, v, seg, bidi, slopes, meta):
  return _ring_fwd(q, k, v, seg, bidi, slopes, meta)[0]


def _ring_fwd(q, k, v, seg, bidi, slopes, meta):
  """Forward over the mesh; the custom VJP wraps the shard_maps of forward and backward."""
  context, scale, interpret, tile, (q_spec, kv_spec, mask_spec, slope_spec, lse_spec) = meta
  mesh = jax.sharding.get_abstract_mesh()
  fwd = lambda q, k, v, s, b, *sl: _ring_forward(q, k, v, s, b, sl[0] if sl else None, context,  # noqa: E731
                                                 scale, interpret, tile)
  args = (q, k, v, seg, bidi) + (() if slopes is None else (slopes,))
  specs = (q_spec, kv_spec, kv_spec, mask_spec, mask_spec) + (() if slopes is None else (slope_spec,))
  out, lse = jax.shard_map(fwd, mesh=mesh, in_specs=specs, out_specs=(q_spec, lse_spec),
                           check_vma=False)(*args)
  return out, (q, k, v, seg, bidi, slopes, out, lse)


def _ring_bwd(meta, residuals, d_out):
  context, scale, _, tile, (q_spec, kv_spec, mask_spec, slope_spec, lse_spec) = meta
  q, k, v, seg, bidi, slopes, out, lse = residuals
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = q_spec[0] if isinstance(q_spec[0], tuple) else (() if q_spec[0] is None else (q_spec[0],))
  reduce_axes = (CONTEXT_AXIS,) + tuple(batch_axes)

  def bwd(q, k, v, s, b, *rest):
    sl, (o, lse_, do) = (rest[0], rest[1:]) if slopes is not None else (None, rest)
    return _ring_backward(q, k, v, s, b, sl, o, lse_, do, context=context, scale=scale, tile=tile,
                          reduce_axes=reduce_axes)
  has = slopes is not None
  args = (q, k, v, seg, bidi) + ((slopes,) if has else ()) + (out, lse, d_out)
  specs = ((q_spec, kv_spec, kv_spec, mask_spec, mask_spec) + ((slope_spec,) if has else ())
           + (q_spec, lse_spec, q_spec))
  out_specs = (q_spec, kv_spec, kv_spec) + ((slope_spec,) if has else ())
  grads = jax.shard_map(bwd, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
  return tuple(grads[:3]) + (None, None, grads[3] if has else None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _specs(q_shape, kv_shape, mesh, rules):
  """shard_map specs: batch and heads as glmjax.pallas.partitioning, length over `context`."""
  from glmjax.pallas.partitioning import attention_specs  # pylint: disable=import-outside-toplevel
  q_spec, kv_spec, mask_spec, slope_spec = attention_specs(q_shape, kv_shape, mesh, rules)
  return (P(q_spec[0], CONTEXT_AXIS, q_spec[2], None), P(kv_spec[0], CONTEXT_AXIS, kv_spec[2], None),
          P(mask_spec[0], CONTEXT_AXIS), slope_spec)


def ring_attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, scale=None,
                   kernel=None, block_k=DEFAULT_BLOCK_K):
  """glmjax.pallas.attention_reference's function with q, k, v in zig-zag order, split along
  length over the `context` mesh axis of the active mesh (see the module docstring).

  kernel: None scores each block in XLA; "interpret" / "compiled" with the Pallas block kernel
  (`glm_ring_block`, forward only; the ring backward recomputes blocks in XLA), in interpret
  mode or not.
  block_k: key tile of the XLA blocks (a divisor of the local length, else the whole chunk):
  scores of one [L / c, block_k] tile are live at a time, forward and backward.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  context = int(mesh.shape[CONTEXT_AXIS])
  check_length(q.shape[1], context)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  q_spec, kv_spec, mask_spec, slope_spec = _specs(q.shape, k.shape, mesh, rules)
  if kernel not in (None, "interpret", "compiled"):
    raise ValueError(f"ring_attention kernel={kernel!r} is not None, 'interpret' or 'compiled'")
  interpret = None if kernel is None else kernel == "interpret"
  lse_spec = P(q_spec[0], kv_spec[2], None, CONTEXT_AXIS)
  meta = (context, scale, interpret, int(block_k or DEFAULT_BLOCK_K),
          (q_spec, kv_spec, mask_spec, slope_spec, lse_spec))
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, F32)
  return _ring(q, k, v, segment_ids, bidirectional, slopes, meta)
