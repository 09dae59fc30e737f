"""Params declared as data: one spec tree walked by init, sharding and export.

`param_specs(config)` returns a nested dict mirroring the params; each leaf is
a `ParamSpec` with the shape, dtype, logical axis names (DESIGN.md section 4)
and initializer. Per-layer params are stacked on a leading `layers` axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from glmjax.model.config import ModelConfig

Initializer = Callable[[jax.Array, tuple, Any], jax.Array]


class ParamSpec(NamedTuple):
  shape: tuple
  axes: tuple  # logical axis name (or None) per dim
  init: Initializer
  dtype: Any = jnp.float32

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def _normal(std: float) -> Initializer:
  return initializers.normal(stddev=std)


def _xavier(gain: float, in_axis, out_axis, batch_axis=(0,)) -> Initializer:
  """Xavier-normal with gain (DeepNorm); fans from one layer's (one expert's) matrix."""
  return initializers.variance_scaling(gain**2, "fan_avg", "normal", in_axis=in_axis,
                                       out_axis=out_axis, batch_axis=batch_axis)


def _norm_specs(config: ModelConfig, prefix_shape: tuple, prefix_axes: tuple, dtype) -> dict:
  specs = {"scale": ParamSpec(prefix_shape + (config.d_model,), prefix_axes + ("embed",),
                              initializers.ones, dtype)}
  if config.norm == "layernorm" and config.norm_bias:
    specs["bias"] = ParamSpec(prefix_shape + (config.d_model,), prefix_axes + ("embed",),
                              initializers.zeros, dtype)
  return specs


def _attention_specs(config: ModelConfig, dtype) -> dict:
  L, D = config.num_layers, config.d_model
  H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
  std = config.init_std
  deep = config.norm_placement == "deepnorm"
  qk_init = _xavier(1.0, 1, (2, 3)) if deep else _normal(std)
  v_init = _xavier(config.deepnorm_beta, 1, (2, 3)) if deep else _normal(std)
  o_init = _xavier(config.deepnorm_beta, (1, 2), 3) if deep else _normal(std)
  specs = {
      "wq": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), qk_init, dtype),
      "wk": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), qk_init, dtype),
      "wv": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), v_init, dtype),
      "wo": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), o_init, dtype),
  }
  if config.qkv_bias:
    zeros = initializers.zeros
    specs["bq"] = ParamSpec((L, H, Dh), ("layers", "heads", "head_dim"), zeros, dtype)
    specs["bk"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), zeros, dtype)
    specs["bv"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), zeros, dtype)
  if config.attn_out_bias:
    specs["bo"] = ParamSpec((L, D), ("layers", "embed"), initializers.zeros, dtype)
  return specs


def _mlp_specs(config: ModelConfig, dtype) -> dict:
  L, D, F, E = config.num_layers, config.d_model, config.ffn_dim, config.num_experts
  deep = config.norm_placement == "deepnorm"
  if E:
    lead, lead_axes = (L, E), ("layers", "experts")
    in_init = _xavier(config.deepnorm_beta, 2, 3, (0, 1)) if deep else _normal(config.init_std)
  else:
    lead, lead_axes = (L,), ("layers",)
    in_init = _xavier(config.deepnorm_beta, 1, 2) if deep else _normal(config.init_std)
  specs = {
      "w_up": ParamSpec(lead + (D, F), lead_axes + ("embed", "mlp"), in_init, dtype),
      "w_down": ParamSpec(lead + (F, D), lead_axes + ("mlp", "embed"), in_init, dtype),
  }
  if config.ffn_gated:
    specs["w_gate"] = ParamSpec(lead + (D, F), lead_axes + ("embed", "mlp"), in_init, dtype)
  if E:
    specs["router"] = ParamSpec((L, D, E), ("layers", "embed", None), _normal(config.init_std), dtype)
  if config.mlp_bias:
    zeros = initializers.zeros
    specs["b_up"] = ParamSpec(lead + (F,), lead_axes + ("mlp",), zeros, dtype)
    specs["b_down"] = ParamSpec(lead + (D,), lead_axes + ("embed",), zeros, dtype)
    if config.ffn_gated:
      specs["b_gate"] = ParamSpec(lead + (F,), lead_axes + ("mlp",), zeros, dtype)
  return specs


def _layer_specs(config: ModelConfig, dtype) -> dict:
  L = config.num_layers
  layer = {"attn_norm": _norm_specs(config, (L,), ("layers",), dtype),
           "attn": _attention_specs(config, dtype),
           "mlp": _mlp_specs(config, dtype)}
  if not (config.parallel_block and config.parallel_shared_norm):
    layer["mlp_norm"] = _norm_specs(config, (L,), ("layers",), dtype)
  if config.norm_placement == "sandwich":
    layer["attn_post_norm"] = _norm_specs(config, (L,), ("layers",), dtype)
    layer["mlp_post_norm"] = _norm_specs(config, (L,), ("layers",), dtype)
  return layer


def param_specs(config: ModelConfig) -> dict:
  """The spec tree (contract): same structure as the params, ParamSpec leaves."""
  dtype = jnp.dtype(config.param_dtype)
  V, D = config.vocab_size, config.d_model
  embed = {"embedding": ParamSpec((V, D), ("vocab", "embed"), _normal(config.init_std), dtype)}
  if config.uses_learned_positions:
    embed["position"] = ParamSpec((config.position_table_rows, D), (None, "embed"),
                                  _normal(config.init_std), dtype)
  if config.position == "learned_2d":
    embed["block_position"] = ParamSpec((config.position_table_rows, D), (None, "embed"),
                                        _normal(config.init_std), dtype)
  specs = {"embed": embed}
  if config.embed_norm:
    specs["embed_norm"] = _norm_specs(config, (), (), dtype)
  specs["layers"] = _layer_specs(config, dtype)
  if config.has_final_norm:
    specs["final_norm"] = _norm_specs(config, (), (), dtype)
  if not config.tie_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), _normal(config.init_std), dtype)}
  if config.lm_head_bias:
    specs.setdefault("lm_head", {})["bias"] = ParamSpec((V,), ("vocab",), initializers.zeros, dtype)
  return specs


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Builds params from `param_specs` (contract).

  Pure and shape-static: works under `jax.eval_shape` (no memory) and under
  `jax.jit(..., out_shardings=...)` so params are born sharded. Each leaf gets
  its own key folded from its path, so adding a param never reshuffles others.
  """
  specs = param_specs(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
  values = []
  for path, spec in leaves:
    key = jax.random.fold_in(rng, _path_hash(path))
    values.append(spec.init(key, spec.shape, spec.dtype))
  return jax.tree_util.tree_unflatten(treedef, values)


def _path_hash(path) -> int:
  """Stable 31-bit hash of a key path (Python's hash() is salted per process)."""
  import zlib  # pylint: disable=import-outside-toplevel
  return zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF


def logical_axes(config: ModelConfig) -> dict:
  """Tree of logical axis-name tuples, mirroring the params."""
  return jax.tree_util.tree_map(lambda s: s.axes, param_specs(config), is_leaf=is_spec)


def count_params(config: ModelConfig) -> int:
  """Total parameter count from the specs (no arrays are created)."""
  return sum(s.size for s in jax.tree_util.tree_leaves(param_specs(config), is_leaf=is_spec))
