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
  as glmjax.pallas.reference. Gradients are autodiff through the ring (the transpose of a
  ppermute is the reverse ppermute), exact like the forward.

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

CONTEXT_AXIS = "context"
F32 = jnp.float32
NEG = -1e30  # running max of a row that has seen no key: finite, so e^(m - m') never makes NaN


def _mesh_axes(logical_name: str, rules) -> tuple:
  spec = spmd.logical_to_mesh_axes((logical_name,), rules)
  entry = spec[0] if spec else None
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def context_size() -> int:
  """Size of the `context` mesh axis when the active rules split `length` over it, else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or not rules:
    return 1
  if CONTEXT_AXIS not in _mesh_axes("length", rules):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _block_pallas(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret):
  return _block_pallas_forward(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret)


def _block_pallas_fwd(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret):
  out = _block_pallas_forward(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret)
  return out, (q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5)


def _block_pallas_bwd(scale, interpret, residuals, cotangents):
  """The block's gradient by recomputing it in XLA (the same function; m carries none)."""
  del interpret
  q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5 = residuals
  d_o, _, d_l = cotangents
  fn = lambda q5, k, v, sl: _block_xla(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, sl, scale)  # noqa: E731
  _, vjp = jax.vjp(fn, q5, k, v, slopes5)
  dq, dk, dv, dslopes = vjp((d_o, jnp.zeros_like(d_l), d_l))
  return dq, dk, dv, None, None, None, None, None, dslopes


_block_pallas.defvjp(_block_pallas_fwd, _block_pallas_bwd)


def _block(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret):
  """A block, skipped (zeros, m = NEG) when no (query, key) pair of it may attend; in XLA when
  `interpret` is None, else the Pallas kernel (interpret mode or compiled)."""
  def compute(_):
    if interpret is None:
      return _block_xla(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale)
    return _block_pallas(q5, k, v, q_seg, q_idx, k_seg, k_bidi, k_idx, slopes5, scale, interpret)

  def skip(_):
    b, n, kv, g, d = q5.shape
    return (jnp.zeros((b, n, kv, g, d), F32), jnp.full((b, kv, g, n), NEG, F32),
            jnp.zeros((b, kv, g, n), F32))

  return jax.lax.cond(jnp.any(_visible(q_seg, q_idx, k_seg, k_bidi, k_idx)), compute, skip, None)


def _ring_local(q, k, v, seg, bidi, slopes, *, context: int, scale: float, interpret):
  """Per-device body under shard_map: local q [b, n, H, d], k/v [b, n, K, d], masks [b, n]."""
  b, n, heads, d = q.shape
  kv = k.shape[2]
  g = heads // kv
  shard = jax.lax.axis_index(CONTEXT_AXIS)
  q_idx = _local_index(shard, n, context)
  q5 = q.reshape(b, n, kv, g, d)
  slopes5 = None if slopes is None else slopes.astype(F32).reshape(1, kv, g, 1, 1)
  o = jnp.zeros((b, n, kv, g, d), F32)
  m = jnp.full((b, kv, g, n), NEG, F32)
  l = jnp.zeros((b, kv, g, n), F32)
  visiting = (k, v, seg, bidi)
  ring = [(i, (i + 1) % context) for i in range(context)]
  for step in range(context):
    k_b, v_b, seg_b, bidi_b = visiting
    source = (shard - step) % context
    k_idx = _local_index(source, n, context)
    o_b, m_b, l_b = _block(q5, k_b, v_b, seg, q_idx, seg_b, bidi_b, k_idx, slopes5, scale, interpret)
    m_new = jnp.maximum(m, m_b)
    a, a_b = jnp.exp(m - m_new), jnp.exp(m_b - m_new)
    l = l * a + l_b * a_b
    to_rows = lambda x: jnp.transpose(x, (0, 3, 1, 2))[..., None]  # noqa: E731  [b,K,G,n]->[b,n,K,G,1]
    o = o * to_rows(a) + o_b * to_rows(a_b)
    m = m_new
    if step + 1 < context:
      visiting = tuple(jax.lax.ppermute(x, CONTEXT_AXIS, ring) for x in visiting)
  l_rows = jnp.transpose(l, (0, 3, 1, 2))[..., None]
  out = jnp.where(l_rows > 0, o / jnp.where(l_rows > 0, l_rows, 1.0), 0.0)
  return out.reshape(b, n, heads, d).astype(q.dtype)


def _specs(q_shape, kv_shape, mesh, rules):
  """shard_map specs: batch and heads as glmjax.pallas.partitioning, length over `context`."""
  from glmjax.pallas.partitioning import attention_specs  # pylint: disable=import-outside-toplevel
  q_spec, kv_spec, mask_spec, slope_spec = attention_specs(q_shape, kv_shape, mesh, rules)
  return (P(q_spec[0], CONTEXT_AXIS, q_spec[2], None), P(kv_spec[0], CONTEXT_AXIS, kv_spec[2], None),
          P(mask_spec[0], CONTEXT_AXIS), slope_spec)


def ring_attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, scale=None,
                   kernel=None):
  """glmjax.pallas.attention_reference's function with q, k, v in zig-zag order, split along
  length over the `context` mesh axis of the active mesh (see the module docstring).

  kernel: None scores each block in XLA; "interpret" / "compiled" with the Pallas block kernel
  (`glm_ring_block`, forward; its gradient recomputes the block in XLA), in interpret mode or not.
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
  body = lambda q, k, v, s, b, sl: _ring_local(q, k, v, s, b, sl, context=context, scale=scale,  # noqa: E731
                                               interpret=interpret)
  if alibi_slopes is None:
    fn = lambda q, k, v, s, b: body(q, k, v, s, b, None)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, mask_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, bidirectional)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, mask_spec, mask_spec, slope_spec),
                       out_specs=q_spec, check_vma=False)(
                           q, k, v, segment_ids, bidirectional, jnp.asarray(alibi_slopes, F32))
