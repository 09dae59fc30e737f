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

Through `glmjax train` (`PrefixConfig.pre_seq_len` > 0 in gin, experiments/ptuning_*.gin):
`PrefixTuning` is the TrainProgram `tuning=` (prefix params beside the frozen base, optimizer on
the prefix only, checkpoints of the prefix + optimizer state naming the base run), and the loop
passes every host batch through `PrefixTuning.host_batch` (the P slots prepended). The KV-cache
decoder (glmjax.model.decode) reads the prefix from the params and concatenates it before each
layer's cache slots, as ChatGLM2-6B's ptuning generation starts from the prefix as
past_key_values: greedy decoding with the cache equals greedy decoding by full forwards over
`with_prefix_rows`.

Limits: one sequence per row (the prefix serves the row's first segment only: DataConfig.pack
must be False, packed rows are refused), no context parallelism (ring attention reorders
positions).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glmjax.model.config import ModelConfig
from glmjax.model.params import ParamSpec, _path_hash, init_params, is_spec, param_specs
from glmjax.model.batch import BATCH_KEYS

PREFIX_NAMES = ("prefix_k", "prefix_v")


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  pre_seq_len: int = 0  # 0: no prefix (ChatGLM-6B ptuning's --pre_seq_len, 128 there)
  init_std: float = 0.02
  base_checkpoint: str = ""  # run directory of the base; "": base initialised from TrainerConfig.seed
  base_step: int = -1  # step of base_checkpoint; -1: its newest

  @property
  def enabled(self) -> bool:
    return self.pre_seq_len > 0


def validate(prefix: PrefixConfig) -> None:
  if not isinstance(prefix.pre_seq_len, int) or prefix.pre_seq_len < 0:
    raise ValueError(f"PrefixConfig.pre_seq_len={prefix.pre_seq_len!r} must be an int >= 0")
  if not prefix.init_std > 0:
    raise ValueError(f"PrefixConfig.init_std={prefix.init_std!r} must be > 0")
  if not isinstance(prefix.base_step, int):
    raise ValueError(f"PrefixConfig.base_step={prefix.base_step!r} must be an int")


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
  segment id, real tokens keep positions 0..n-1 (block positions 0 on the slots). A row holding
  several sequences (packed) is refused: the prefix would serve its first one only."""
  batch = dict(batch)
  rows, length = batch["tokens"].shape
  P = pre_seq_len
  if "segment_ids" in batch:
    seg = np.asarray(batch["segment_ids"])
    nonzero = np.where(seg > 0, seg, np.iinfo(np.int32).max)
    if np.any((seg > 0) & (seg != nonzero.min(axis=1, keepdims=True))):
      raise ValueError("PrefixConfig.pre_seq_len: a batch row holds several sequences (packed); the "
                       "prefix serves one sequence per row: set DataConfig.pack = False")
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


def _tree_zip(full, other, fn, path=()):
  if isinstance(full, dict):
    return {k: _tree_zip(v, other[k], fn, path + (k,)) for k, v in full.items()}
  return fn(path, full, other)


def _is_prefix_name(path) -> bool:
  return bool(path) and path[-1] in PREFIX_NAMES


class PrefixTuning:
  """What TrainProgram asks of a parameter-efficient method (see lora.LoraTuning), for P-Tuning v2;
  plus `host_batch`, which the train loop applies to every host batch (train and eval)."""

  def __init__(self, model_config: ModelConfig, prefix: PrefixConfig):
    validate(prefix)
    self.model_config = model_config
    self.prefix = prefix
    specs = param_specs(model_config)
    self.specs = {**specs, "layers": {**specs["layers"], "attn": {
        **specs["layers"]["attn"], **prefix_specs(model_config, prefix)}}}

  def init_params(self, rng: jax.Array, base: Optional[dict] = None) -> dict:
    if base is None:
      base = init_params(self.model_config, rng)
    return apply_prefix(base, self.model_config, self.prefix, jax.random.fold_in(rng, 0x9F1E))

  def param_shardings(self, mesh, rules) -> dict:
    from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, shd.logical_to_spec(s.axes, rules, mesh)),
                        self.specs, is_leaf=is_spec)

  def wrap_optimizer(self, optimizer):
    return freeze_base(optimizer)

  def load_base(self, mesh, rules) -> Optional[dict]:
    from glmjax.tuning import lora  # pylint: disable=import-outside-toplevel
    return lora.load_base(self.model_config, self.prefix.base_checkpoint, self.prefix.base_step, mesh,
                          rules, "PrefixConfig")

  def checkpoint_view(self, state: dict) -> dict:
    """The prefix (and optimizer state) only; None for every frozen base leaf."""
    params = state["params"]
    return {**state, "params": _tree_zip(params, params,
                                         lambda path, x, _: x if _is_prefix_name(path) else None)}

  def complete(self, restored: dict, fresh: dict) -> dict:
    return {**restored, "params": _tree_zip(fresh["params"], restored["params"],
                                            lambda path, f, r: r if _is_prefix_name(path) else f)}

  def host_batch(self, batch: dict) -> dict:
    return with_prefix_rows(batch, self.prefix.pre_seq_len)


def tuning_for(model_config: ModelConfig, prefix: Optional[PrefixConfig], data=None) -> Optional[PrefixTuning]:
  """PrefixTuning when `prefix.pre_seq_len` > 0; refuses packed seqio data (`data`: DataConfig)."""
  if prefix is None:
    return None
  validate(prefix)
  if not prefix.enabled:
    return None
  if data is not None and getattr(data, "pack", False):
    raise ValueError("PrefixConfig.pre_seq_len > 0 needs one sequence per row: set DataConfig.pack = False")
  return PrefixTuning(model_config, prefix)


def restore_prefix_params(checkpoints_dir: str, step: int, experiment, mesh, rules) -> dict:
  """A P-Tuning run's params on `mesh`: its base (base_checkpoint, or the seed's init as in
  training) with the prefix of checkpoint `step`. The KV-cache decoder (generate) uses the prefix
  from these params on its own; a full forward over them (eval scoring) must get
  `with_prefix_rows` batches, since the attention sublayer writes the prefix over a row's first P
  positions."""
  from glmjax.run.load import restore_params  # pylint: disable=import-outside-toplevel
  tuning = PrefixTuning(experiment.model, experiment.prefix)
  init = jax.jit(tuning.init_params, out_shardings=tuning.param_shardings(mesh, rules))
  full = init(jax.random.PRNGKey(experiment.trainer.seed), tuning.load_base(mesh, rules))
  view = tuning.checkpoint_view({"params": full})["params"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), view)
  restored = restore_params(checkpoints_dir, step, abstract)
  return tuning.complete({"params": restored}, {"params": full})["params"]
