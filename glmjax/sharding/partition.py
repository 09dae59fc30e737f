"""Logical axis names -> `PartitionSpec`s / `NamedSharding`s for params, optimizer state and batches.

The model names logical axes only (`ParamSpec.axes`, activation constraints);
this module is the one place that maps them onto mesh axes, through a rules
table (`MeshConfig.rules`, gin-configurable; defaults in DESIGN.md section 4).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import optax
from flax import linen as nn
from flax.linen import spmd
from jax.sharding import NamedSharding, PartitionSpec

from glmjax.model import ModelConfig, is_spec, param_specs

BATCH_AXES = ("batch", "length")


def normalise_rules(rules: Sequence) -> tuple:
  """Rules as a tuple of (logical name, mesh axis | tuple of mesh axes | None); lists from gin become tuples."""
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"MeshConfig.rules: each rule is (logical_axis, mesh_axes), got {rule!r}")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def _mesh_axes_of(entry) -> tuple:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(axes: Sequence, rules: Sequence, mesh: jax.sharding.Mesh) -> PartitionSpec:
  """PartitionSpec for one array's logical axes; mesh axes of size 1 are dropped (they shard nothing)."""
  raw = spmd.logical_to_mesh_axes(tuple(axes), normalise_rules(rules))
  entries = []
  for entry in raw:
    kept = tuple(a for a in _mesh_axes_of(entry) if mesh.shape[a] > 1)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*entries)


def check_divisible(name: str, shape: Sequence[int], axes: Sequence, spec: PartitionSpec,
                    mesh: jax.sharding.Mesh) -> None:
  """ValueError naming the array, dimension and mesh axes when a sharded dim does not split evenly."""
  for dim, (size, logical, entry) in enumerate(zip(shape, axes, tuple(spec) + (None,) * len(shape))):
    mesh_axes = _mesh_axes_of(entry)
    parts = math.prod(mesh.shape[a] for a in mesh_axes)
    if parts > 1 and size % parts:
      raise ValueError(
          f"{name}: dimension {dim} (logical axis {logical!r}) has size {size}, which the mesh axes "
          f"{'x'.join(mesh_axes)} = {parts} cannot split evenly; change the mesh sizes "
          f"(MeshConfig) or map {logical!r} elsewhere in MeshConfig.rules, e.g. ({logical!r}, None)")


def param_partition_specs(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
  """Tree of PartitionSpecs mirroring the params, checked for divisibility."""
  specs = param_specs(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
  out = []
  for path, spec in flat:
    pspec = logical_to_spec(spec.axes, rules, mesh)
    check_divisible(f"param {jax.tree_util.keystr(path)}", spec.shape, spec.axes, pspec, mesh)
    out.append(pspec)
  return jax.tree_util.tree_unflatten(treedef, out)


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
  return jax.tree.map(lambda p: NamedSharding(mesh, p), param_partition_specs(config, mesh, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence) -> NamedSharding:
  """Sharding of every [batch, length] batch field."""
  return NamedSharding(mesh, logical_to_spec(BATCH_AXES, rules, mesh))


def batch_divisor(mesh: jax.sharding.Mesh, rules: Sequence) -> int:
  """Number of parts the batch dimension is split into (the global batch must be a multiple)."""
  entry = logical_to_spec(BATCH_AXES, rules, mesh)[0]
  return math.prod(mesh.shape[a] for a in _mesh_axes_of(entry))


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                        params_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings of the optimizer state, matched to params by key path and shape.

  A state leaf whose key path ends with a param's path and has that param's
  shape (Adam moments, unfactored Adafactor statistics) takes the param's
  sharding; everything else (step counts, Adafactor's factored row/column
  statistics) is replicated.
  """
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    by_path[tuple(path)] = leaf.shape
  param_sharding_by_path = {
      tuple(path): sharding for path, sharding in jax.tree_util.tree_flatten_with_path(
          params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
  rep = replicated(mesh)

  def sharding_for(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      suffix = path[start:]
      if suffix in by_path and by_path[suffix] == getattr(leaf, "shape", None):
        return param_sharding_by_path[suffix]
    return rep

  return jax.tree_util.tree_map_with_path(sharding_for, abstract_state)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Sequence) -> Iterator[None]:
  """Makes the model's `with_logical_constraint` calls bind to `mesh` while tracing.

  flax's logical constraints apply only when a mesh is set with `jax.set_mesh`
  (the legacy `with mesh:` leaves the abstract mesh empty and they silently no-op).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(normalise_rules(rules)):
    yield
