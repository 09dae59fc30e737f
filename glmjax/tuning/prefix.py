"""P-Tuning v2 (Liu et al. 2022, arXiv:2110.07602; ChatGLM-6B's `ptuning/`, `pre_seq_len`):
trainable per-layer prefix keys and values in attention, the base frozen.

ChatGLM-6B passes its PrefixEncoder's output as `past_key_values`: P cached (already
position-encoded) keys / values per layer that every query attends to. Here the P prefix slots
are the first P positions of each row (`with_prefix_rows` prepends them): the attention sublayer
replaces those positions' keys and values by `prefix_k` / `prefix_v` [layers, P, kv_heads,
head_dim] (glmjax.model.layers.with_prefix), after RoPE, as a cache entry. Every later query of
the row attends to them (causal order already allows it, and GLM Part A sees them too); what the
slots compute themselves never reaches another position, since their keys / values are replaced
in every layer, and their loss_mask is 0. Real tokens keep their positions 0..n-1.

Limits: one sequence per row (the prefix serves the row's first segment only), no context
parallelism (ring attention reorders positions), and the KV-cache decoder does not write the
prefix (generation after P-Tuning is not wired).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glmjax.model.config import ModelConfig
from glmjax.model.params import ParamSpec, _path_hash
from glmjax.model.batch import BATCH_KEYS

PREFIX_NAMES = ("prefix_k", "prefix_v")


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  pre_seq_len: int = 0  # 0: no prefix
  init_std: float = 0.02


def validate(prefix: PrefixConfig) -> None:
  if not isinstance(prefix.pre_seq_len, int) or prefix.pre_seq_len < 0:
    raise ValueError(f"PrefixConfig.pre_seq_len={prefix.pre_seq_len!r} must be an int >= 0")
  if not prefix.init_std > 0:
    raise ValueError(f"PrefixConfig.init_std={prefix.init_std!r} must be > 0")


def prefix_specs(config: ModelConfig, prefix: PrefixConfig) -> dict:
  """{"prefix_k", "prefix_v"} specs of the attention group, stacked over layers."""
  validate(prefix)
  if prefix.pre_seq_len < 1:
    raise ValueError("PrefixConfig.pre_seq_len=0: no prefix to build; set it >= 1")
  shape = (config.num_layers, prefix.pre_seq_len, config.num_kv_heads, config.head_dim)
  axes = ("layers", None, "kv_heads", "head_dim")
  init = jax.nn.initializers.normal(prefix.init_std)
  return {name: ParamSpec(shape, axes, init, jnp.dtype(config.param_dtype)) for name in PREFIX_NAMES}


def apply_prefix(params: dict, config: ModelConfig, prefix: PrefixConfig, rng: jax.Array) -> dict:
  """`params` with prefix keys / values added to every layer's attention group."""
  specs = prefix_specs(config, prefix)
  attn = dict(params["layers"]["attn"])
  for name, spec in specs.items():
    attn[name] = spec.init(jax.random.fold_in(rng, _path_hash((name,))), spec.shape, spec.dtype)
  return {**params, "layers": {**params["layers"], "attn": attn}}


def _is_prefix(path) -> bool:
  return bool(path) and str(getattr(path[-1], "key", "")) in PREFIX_NAMES


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: "prefix" if _is_prefix(path) else "frozen", params)
  return optax.multi_transform({"prefix": optimizer, "frozen": optax.set_to_zero()}, labels)


def with_prefix_rows(batch: dict, pre_seq_len: int) -> dict:
  """Prepends the P prefix slots to every row (host numpy): loss_mask 0, the row's first
  segment id, real tokens keep positions 0..n-1 (block positions 0 on the slots)."""
  batch = dict(batch)
  rows, length = batch["tokens"].shape
  P = pre_seq_len
  if "positions" not in batch:
    batch["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
  if "segment_ids" not in batch:
    batch["segment_ids"] = np.ones((rows, length), np.int32)
  out = {}
  for key, value in batch.items():
    if key not in BATCH_KEYS:
      out[key] = value
      continue
    value = np.asarray(value)
    if key == "segment_ids":
      head = np.repeat(value[:, :1], P, axis=1)
    else:
      head = np.zeros((rows, P), value.dtype)
    out[key] = np.concatenate([head, value], axis=1)
  return out
