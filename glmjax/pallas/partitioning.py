"""Running the flash kernels on a sharded mesh.

Pallas kernels lower to custom calls (Mosaic, Triton) that GSPMD cannot
partition: under a multi-device mesh it would gather q, k and v onto every
device. Attention is independent per sequence and per kv-head group, so the
kernel runs under `shard_map` with batch and heads split the way the logical
axis rules split the activations, and length kept whole per device.
"""

from __future__ import annotations

import math

import jax
from flax.linen import spmd
from jax.sharding import PartitionSpec as P


def mesh_axes(logical_name: str, rules) -> tuple:
  """The mesh axes the rules map one logical axis name to (a tuple, possibly empty)."""
  spec = spmd.logical_to_mesh_axes((logical_name,), rules)
  entry = spec[0] if spec else None
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _usable(axes: tuple, mesh, dims: tuple) -> tuple:
  """`axes` if their product divides every size in `dims`, else () (replicate)."""
  size = math.prod(mesh.shape[a] for a in axes)
  return axes if all(d % size == 0 for d in dims) else ()


def _entry(axes: tuple):
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def attention_specs(q_shape, kv_shape, mesh, rules):
  """PartitionSpecs (q, kv, [b, l] masks, slopes) for the kernel's shard_map.

  Heads are split only when both query and kv heads divide by the split, so
  each device keeps whole GQA groups (query head h reads kv head h // group).
  """
  batch_axes = _usable(mesh_axes("batch", rules), mesh, (q_shape[0],))
  head_axes = mesh_axes("heads", rules)
  if head_axes != mesh_axes("kv_heads", rules):
    head_axes = ()
  head_axes = _usable(tuple(a for a in head_axes if a not in batch_axes), mesh,
                      (q_shape[2], kv_shape[2]))
  b, h = _entry(batch_axes), _entry(head_axes)
  return P(b, None, h, None), P(b, None, h, None), P(b, None), P(h)


def shard_kernel(kernel, q, k, v, segment_ids, bidirectional, alibi_slopes):
  """Calls `kernel(q, k, v, segment_ids, bidirectional, alibi_slopes)` per shard
  when a multi-device mesh and logical axis rules are active; directly otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    return kernel(q, k, v, segment_ids, bidirectional, alibi_slopes)
  q_spec, kv_spec, mask_spec, slope_spec = attention_specs(q.shape, k.shape, mesh, rules)
  if alibi_slopes is None:
    fn = lambda q, k, v, s, b: kernel(q, k, v, s, b, None)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, mask_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, bidirectional)
  return jax.shard_map(kernel, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, mask_spec, mask_spec, slope_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, bidirectional,
                                                          alibi_slopes)
