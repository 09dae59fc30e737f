"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform of the param spec tree.

Eq. 3, h = W0 x + (alpha / r) B A x, in glmjax's [in, out] weight layout:

    y = x W + (alpha / r) (x A) B,    A [in..., r], B [r, out...]

`lora_specs(config, lora)` replaces each chosen projection's `ParamSpec` by a `LoraWeight`
node holding the base spec and the two adapter specs. Adapters keep the base's leading `layers`
(and `experts`) axis, so the layer scan slices them with their base, and carry the base's logical
axes on their input / output dims (the rank dim is unsharded), so they shard like their base.
A is initialised as PEFT does (kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(fan_in),
1/sqrt(fan_in))), B with zeros (paper sec. 4.1: the adapted model starts as the base).

Inside the scan `glmjax.model.layers.materialize` calls `LoraWeight.dense()`,
W + (alpha / r) A B with the base under stop_gradient (no base weight gradient is computed),
one layer at a time; the optimizer leaves the base untouched through
`optax.multi_transform` with `set_to_zero` for every non-adapter leaf (no optimizer state for
them either).

Adapter dropout (PEFT's `lora_dropout`, `LoraConfig.dropout` = p): in train mode only,
y = x W + (alpha / r) (dropout_p(x) A) B, the mask on the adapter input only (the base sees x
whole), kept entries scaled by 1 / (1 - p) as torch.nn.Dropout. The merged form cannot express a
per-token mask, so the train forward sees `dropout_view(params, key)`: each LoraWeight becomes a
`LoraDropoutWeight` that `materialize` leaves unmerged and whose `matmul_2d(x)` computes both
branches from x. Its mask for layer l of the projection at key path `path` is

    jax.random.bernoulli(fold_in(fold_in(key, _path_hash(path)), l), 1 - p, [tokens, in])

(x flattened to [tokens, in] as `layers.matmul_2d` does), `key` = fold_in(state rng, step) in the
train step. Eval, generate, merge and export read the plain LoraWeight tree: no dropout there.
This needs two hooks outside glmjax/tuning (see `dropout_wired`): glmjax.model.layers.matmul_2d
dispatching to a weight's own `matmul_2d`, and the LM train step calling `train_forward(key)`.

Checkpoints of a LoRA run hold the adapters and optimizer state only (`adapters_only`); the base
is named by `LoraConfig.base_checkpoint` (a run directory) in the run's saved gin config and is
read again on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.nn import initializers
from jax.sharding import NamedSharding

from glmjax.model.config import ModelConfig
from glmjax.model.params import ParamSpec, _path_hash, init_params, is_spec, param_specs

# Projection name -> number of input dims after the leading layers / experts axes.
PROJECTIONS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_up": 1, "w_gate": 1, "w_down": 1}
LEAD_AXES = ("layers", "experts")
ADAPTER_FIELDS = ("a", "b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0: no adapters (a plain run)."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple = ("wq", "wv")  # projection names, or ("all",): every projection incl. the MLP
  base_checkpoint: str = ""  # run directory of the base; "": base initialised from TrainerConfig.seed
  base_step: int = -1  # step of base_checkpoint; -1: its newest
  quantize: str = ""  # QLoRA: "nf4" or "int8" base (glmjax.tuning.quant), "": float base
  dropout: float = 0.0  # PEFT's lora_dropout: on the adapter input, train mode only

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def validate(lora: LoraConfig) -> None:
  if not isinstance(lora.rank, int) or lora.rank < 0:
    raise ValueError(f"LoraConfig.rank={lora.rank!r} must be an int >= 0 (0: no LoRA)")
  if not lora.alpha > 0:
    raise ValueError(f"LoraConfig.alpha={lora.alpha!r} must be > 0")
  targets = tuple(lora.targets)
  if not targets:
    raise ValueError("LoraConfig.targets is empty; name projections (e.g. ('wq', 'wv')) or ('all',)")
  if targets != ("all",):
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
      raise ValueError(f"LoraConfig.targets: {unknown} not among {sorted(PROJECTIONS)} or ('all',)")
  if not (isinstance(lora.dropout, (int, float)) and 0.0 <= lora.dropout < 1.0):
    raise ValueError(f"LoraConfig.dropout={lora.dropout!r} must be in [0, 1)")
  if lora.quantize not in ("", "nf4", "int8"):
    raise ValueError(f"LoraConfig.quantize={lora.quantize!r} is not '', 'nf4' or 'int8'")


def target_names(lora: LoraConfig) -> tuple:
  return tuple(PROJECTIONS) if tuple(lora.targets) == ("all",) else tuple(lora.targets)


@dataclasses.dataclass
class LoraWeight:
  """A frozen base weight and its adapters, in the params tree where the weight was.

  base: the weight (an array, or anything with `.dense()`, e.g. a quantized weight);
  a: lead + in + (r,); b: lead + (r,) + out; scale = alpha / r and in_ndim are static."""
  base: Any
  a: Any
  b: Any
  scale: float = 1.0
  in_ndim: int = 1

  def delta(self):
    """(A B) with the leading axes batched, shaped like the base."""
    rank = self.a.shape[-1]
    lead = self.a.ndim - self.in_ndim - 1
    a2 = self.a.reshape(self.a.shape[:lead] + (-1, rank))
    b2 = self.b.reshape(self.b.shape[:lead] + (rank, -1))
    return jnp.matmul(a2, b2).reshape(self.a.shape[:-1] + self.b.shape[lead + 1:])

  def dense(self):
    base = self.base.dense() if hasattr(self.base, "dense") else self.base
    base = jax.lax.stop_gradient(base)
    return base + (self.scale * self.delta()).astype(base.dtype)


jax.tree_util.register_dataclass(LoraWeight, data_fields=["base", "a", "b"],
                                 meta_fields=["scale", "in_ndim"])


def is_lora(x) -> bool:
  return isinstance(x, LoraWeight)


@dataclasses.dataclass
class LoraDropoutWeight:
  """A LoraWeight in train mode with adapter dropout: x W + scale (dropout(x) A) B.

  Array-like enough for the layer code (`shape`, `astype`, a 2-D `reshape`) and not merged by
  `materialize` (no `.dense()`); `matmul_2d(x)` is what glmjax.model.layers.matmul_2d calls.
  key: lead + (2,) raw uint32 keys, one per layer, sliced by the layer scan with the base."""
  base: Any
  a: Any
  b: Any
  key: Any
  scale: float = 1.0
  in_ndim: int = 1
  rate: float = 0.0
  dtype: Any = None  # compute dtype set by astype; None: the adapters' own
  shape2d: Optional[tuple] = None  # (in, out) after reshape; None: the base's own layout

  @property
  def _base_shape(self) -> tuple:
    lead = self.a.ndim - self.in_ndim - 1
    return tuple(self.a.shape[:-1]) + tuple(self.b.shape[lead + 1:])

  @property
  def shape(self) -> tuple:
    return self.shape2d if self.shape2d is not None else self._base_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def astype(self, dtype):
    return dataclasses.replace(self, dtype=jnp.dtype(dtype))

  def reshape(self, *shape):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    lead = self.a.ndim - self.in_ndim - 1
    if lead:
      raise ValueError("LoraDropoutWeight.reshape: only one layer's slice can be reshaped")
    n_in = math.prod(self.a.shape[:-1])
    n_out = math.prod(self.b.shape[1:])
    if len(shape) != 2 or shape[0] not in (n_in, -1) or shape[1] not in (n_out, -1):
      raise ValueError(f"LoraDropoutWeight.reshape{shape}: only the 2-D form ({n_in}, {n_out})")
    return dataclasses.replace(self, shape2d=(n_in, n_out))

  def matmul_2d(self, x, **kwargs):
    """x [..., in] -> [..., out]: the base on x, the adapters on dropout(x)."""
    rank = self.a.shape[-1]
    n_in = x.shape[-1]
    dtype = self.dtype or self.a.dtype
    base = self.base.dense() if hasattr(self.base, "dense") else self.base
    w = jax.lax.stop_gradient(base).astype(dtype).reshape(n_in, -1)
    a = self.a.astype(dtype).reshape(n_in, rank)
    b = self.b.astype(dtype).reshape(rank, -1)
    x2 = x.reshape(-1, n_in)
    keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x2.shape)
    dropped = jnp.where(keep, x2 / jnp.asarray(1.0 - self.rate, x2.dtype), jnp.zeros((), x2.dtype))
    y = jnp.dot(x2, w, **kwargs) + self.scale * jnp.dot(jnp.dot(dropped, a), b, **kwargs)
    return y.reshape(x.shape[:-1] + (w.shape[-1],))


jax.tree_util.register_dataclass(LoraDropoutWeight, data_fields=["base", "a", "b", "key"],
                                 meta_fields=["scale", "in_ndim", "rate", "dtype", "shape2d"])


def dropout_view(params: dict, key: jax.Array, rate: float) -> dict:
  """Train-mode params: each LoraWeight a LoraDropoutWeight with per-layer keys
  fold_in(fold_in(key, _path_hash(path)), layer); rate 0: `params` unchanged."""
  if not rate:
    return params

  def view(path, x):
    if not is_lora(x):
      return x
    lead = x.a.ndim - x.in_ndim - 1
    if lead != 1:
      raise ValueError(f"LoraConfig.dropout: {jax.tree_util.keystr(path)} has {lead} leading axes "
                       "(mixture-of-experts weights); adapter dropout covers dense projections only")
    k = jax.random.fold_in(key, _path_hash(path))
    keys = jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(x.a.shape[0], dtype=jnp.uint32))
    return LoraDropoutWeight(x.base, x.a, x.b, keys, x.scale, x.in_ndim, float(rate))
  return jax.tree_util.tree_map_with_path(view, params, is_leaf=is_lora)


def dropout_wired() -> bool:
  """Whether adapter dropout reaches the model: glmjax.model.layers.matmul_2d must hand a weight
  with `matmul_2d` its input (layers.INPUT_AWARE_WEIGHTS) and the LM train step must call
  `tuning.train_forward(key)` (glmjax.trainer.step.TUNING_TRAIN_FORWARD)."""
  from glmjax.model import layers  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import step  # pylint: disable=import-outside-toplevel
  return bool(getattr(layers, "INPUT_AWARE_WEIGHTS", False)) and bool(
      getattr(step, "TUNING_TRAIN_FORWARD", False))


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def adapter_spec(spec: ParamSpec, name: str, lora: LoraConfig) -> LoraWeight:
  """The LoraWeight spec of one projection: A and B beside the base spec."""
  lead = sum(1 for ax in spec.axes if ax in LEAD_AXES)
  n_in = PROJECTIONS[name]
  r = lora.rank
  lead_shape, lead_axes = spec.shape[:lead], spec.axes[:lead]
  in_shape, in_axes = spec.shape[lead:lead + n_in], spec.axes[lead:lead + n_in]
  out_shape, out_axes = spec.shape[lead + n_in:], spec.axes[lead + n_in:]
  fan_in = math.prod(in_shape)
  a = ParamSpec(lead_shape + in_shape + (r,), lead_axes + in_axes + (None,),
                _uniform(1.0 / math.sqrt(fan_in)), spec.dtype)
  b = ParamSpec(lead_shape + (r,) + out_shape, lead_axes + (None,) + out_axes, initializers.zeros,
                spec.dtype)
  return LoraWeight(spec, a, b, lora.scale, n_in)


def lora_specs(config: ModelConfig, lora: LoraConfig) -> dict:
  """param_specs(config) with each targeted projection a LoraWeight of specs."""
  validate(lora)
  if not lora.enabled:
    raise ValueError("LoraConfig.rank=0: no adapters to build; set rank >= 1")
  targets = target_names(lora)
  found = set()

  def wrap(path, spec):
    name = _key_name(path[-1])
    if name not in targets or _key_name(path[0]) != "layers":
      return spec
    found.add(name)
    return adapter_spec(spec, name, lora)

  specs = jax.tree_util.tree_map_with_path(wrap, param_specs(config), is_leaf=is_spec)
  missing = [t for t in targets if t not in found]
  if missing and tuple(lora.targets) != ("all",):
    raise ValueError(f"LoraConfig.targets: {missing} are not projections of this model "
                     f"(its projections: {sorted(found | (set(PROJECTIONS) - set(missing)))})")
  return specs


def init_adapters(specs: dict, base: dict, rng: jax.Array) -> dict:
  """`base` params with each LoraWeight spec's adapters initialised (keys folded from the path)."""
  def build(path, spec, leaf):
    if not is_lora(spec):
      return leaf
    key = jax.random.fold_in(rng, _path_hash(path))
    return LoraWeight(leaf, spec.a.init(jax.random.fold_in(key, 0), spec.a.shape, spec.a.dtype),
                      spec.b.init(jax.random.fold_in(key, 1), spec.b.shape, spec.b.dtype),
                      spec.scale, spec.in_ndim)
  return jax.tree_util.tree_map_with_path(build, specs, base, is_leaf=lambda x: is_spec(x) or is_lora(x))


def apply_lora(params: dict, config: ModelConfig, lora: LoraConfig, rng: jax.Array) -> dict:
  """Plain params -> the same params with adapters beside the targeted projections (B = 0)."""
  return init_adapters(lora_specs(config, lora), params, jax.random.fold_in(rng, 0x10FA))


def merge(params: dict) -> dict:
  """LoRA params -> plain params with W + (alpha / r) A B (the adapters folded in)."""
  return jax.tree.map(lambda x: x.dense() if is_lora(x) else x, params, is_leaf=is_lora)


def adapters(params: dict) -> dict:
  """The adapter tree: {path: {"a", "b"}} nested like params, only the adapted projections."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]:
    if is_lora(leaf):
      node = out
      for entry in path[:-1]:
        node = node.setdefault(_key_name(entry), {})
      node[_key_name(path[-1])] = {"a": leaf.a, "b": leaf.b}
  return out


def is_adapter_path(path) -> bool:
  entry = path[-1] if path else None
  return isinstance(entry, jax.tree_util.GetAttrKey) and entry.name in ADAPTER_FIELDS


def trainable_labels(params) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "adapter" if is_adapter_path(path) else "frozen", params)


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` on the adapters only; every other leaf gets a zero update and no state."""
  return optax.multi_transform({"adapter": optimizer, "frozen": optax.set_to_zero()}, trainable_labels)


def _zip(full, other, fn):
  if isinstance(full, dict):
    return {k: _zip(v, other[k], fn) for k, v in full.items()}
  return fn(full, other)


def adapters_only(params: dict) -> dict:
  """What a LoRA checkpoint holds of the params: the adapters, None for every frozen leaf."""
  return _zip(params, params, lambda x, _: dataclasses.replace(x, base=None) if is_lora(x) else None)


def with_base(saved: dict, full: dict) -> dict:
  """`adapters_only` params back into the full tree `full` (its bases and frozen leaves kept)."""
  return _zip(full, saved, lambda f, s: dataclasses.replace(f, a=s.a, b=s.b) if is_lora(f) else f)


class LoraTuning:
  """What TrainProgram asks of a parameter-efficient method (glmjax.trainer.step `tuning=`):
  the params tree and its shardings, the optimizer wrapper and the checkpoint view."""

  def __init__(self, model_config: ModelConfig, lora: LoraConfig):
    self.model_config = model_config
    self.lora = lora
    self.specs = lora_specs(model_config, lora)
    if lora.dropout and not dropout_wired():
      raise ValueError(
          f"LoraConfig.dropout={lora.dropout} is not wired into the train step yet (glmjax.model.layers."
          "matmul_2d and glmjax.trainer.step need the hooks named in glmjax.tuning.lora.dropout_wired); "
          "set LoraConfig.dropout = 0.0")

  def train_forward(self, key: jax.Array, forward=None):
    """The forward of a train step whose dropout masks come from `key` (fold_in(rng, step)):
    forward(dropout_view(params, key), batch, config); LoraConfig.dropout 0: `forward` itself."""
    if forward is None:
      from glmjax.model import forward_with_aux as forward  # pylint: disable=import-outside-toplevel
    if not self.lora.dropout:
      return forward
    rate = self.lora.dropout
    return lambda params, batch, config: forward(dropout_view(params, key, rate), batch, config)

  def init_params(self, rng: jax.Array, base: Optional[dict] = None) -> dict:
    """Adapters around `base` (the loaded base params), or around init_params(config, rng)."""
    if self.lora.quantize:  # QLoRA: the frozen base stored quantized, built a layer at a time
      from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
      if base is None:
        base = quant.init_quantized_params(self.model_config, rng, self.lora.quantize)
      else:  # load_base gives it quantized already; a float base is quantized layer by layer
        base = quant.quantize_params(base, self.model_config, self.lora.quantize)
    elif base is None:
      base = init_params(self.model_config, rng)
    return apply_lora(base, self.model_config, self.lora, rng)

  def param_shardings(self, mesh, rules) -> dict:
    """Adapters and float leaves by their logical axes; quantized arrays replicated."""
    from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
    from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
    by_axes = lambda s: NamedSharding(mesh, shd.logical_to_spec(s.axes, rules, mesh))  # noqa: E731
    if not self.lora.quantize:
      return jax.tree.map(by_axes, self.specs, is_leaf=is_spec)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(shape, spec):
      if isinstance(shape, dict):
        return {k: place(v, spec[k]) for k, v in shape.items()}
      if is_lora(shape):
        return dataclasses.replace(shape, base=place(shape.base, spec.base), a=by_axes(spec.a),
                                   b=by_axes(spec.b))
      if quant.is_quantized(shape):
        return jax.tree.map(lambda _: replicated, shape)
      return by_axes(spec)
    return place(jax.eval_shape(self.init_params, jax.random.PRNGKey(0)), self.specs)

  def wrap_optimizer(self, optimizer):
    return freeze_base(optimizer)

  def load_base(self, mesh, rules) -> Optional[dict]:
    """The base params of `base_checkpoint` on this mesh (params only), or None (random base)."""
    if not self.lora.quantize:
      return load_base(self.model_config, self.lora.base_checkpoint, self.lora.base_step, mesh, rules,
                       "LoraConfig")
    if not self.lora.base_checkpoint:
      return None
    from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
    workdir, step = base_step_of(self.lora.base_checkpoint, self.lora.base_step, "LoraConfig")
    return quant.load_quantized_base(self.model_config, workdir.checkpoints, step, mesh, rules,
                                     self.lora.quantize)

  def checkpoint_view(self, state: dict) -> dict:
    return {**state, "params": adapters_only(state["params"])}

  def complete(self, restored: dict, fresh: dict) -> dict:
    """A restored checkpoint_view put back around the bases of `fresh` (a just-built state)."""
    return {**restored, "params": with_base(restored["params"], fresh["params"])}


def base_step_of(base_checkpoint: str, base_step: int, owner: str):
  """(Workdir, step) of a base run: `base_step`, or its newest step when -1."""
  from glmjax.run.directory import Workdir  # pylint: disable=import-outside-toplevel
  workdir = Workdir(base_checkpoint)
  steps = workdir.steps()
  if not steps:
    raise ValueError(f"{owner}.base_checkpoint={base_checkpoint!r} has no checkpoints")
  step = max(steps) if base_step < 0 else base_step
  if step not in steps:
    raise ValueError(f"{owner}.base_step={step} is not a step of {workdir.path} (steps: {steps})")
  return workdir, step


def load_base(model_config: ModelConfig, base_checkpoint: str, base_step: int, mesh, rules,
              owner: str) -> Optional[dict]:
  """Params of run directory `base_checkpoint` at `base_step` (-1: its newest) on `mesh`, or None
  when no base is named; `owner` names the config class in the error lines."""
  if not base_checkpoint:
    return None
  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from glmjax.run.load import restore_params  # pylint: disable=import-outside-toplevel
  workdir, step = base_step_of(base_checkpoint, base_step, owner)
  shardings = shd.param_shardings(model_config, mesh, rules)
  shapes = jax.eval_shape(functools.partial(init_params, model_config), jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return restore_params(workdir.checkpoints, step, abstract)


def restore_lora_params(checkpoints_dir: str, step: int, experiment, mesh, rules) -> dict:
  """A LoRA run's params (LoraWeight tree) on `mesh`: its base (base_checkpoint, or the seed's
  init as in training) and the adapters of checkpoint `step`."""
  from glmjax.run.load import restore_params  # pylint: disable=import-outside-toplevel
  tuning = LoraTuning(experiment.model, experiment.lora)
  init = jax.jit(tuning.init_params, out_shardings=tuning.param_shardings(mesh, rules))
  full = init(jax.random.PRNGKey(experiment.trainer.seed), tuning.load_base(mesh, rules))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          adapters_only(full))
  return with_base(restore_params(checkpoints_dir, step, abstract), full)


def load_merged(checkpoints_dir: str, step: int, experiment, mesh, rules) -> dict:
  """restore_lora_params merged into plain params (what generate / eval / export read)."""
  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  params = restore_lora_params(checkpoints_dir, step, experiment, mesh, rules)
  return jax.jit(merge, out_shardings=shd.param_shardings(experiment.model, mesh, rules))(params)


def tuning_for(model_config: ModelConfig, lora: Optional[LoraConfig]) -> Optional[LoraTuning]:
  if lora is None:
    return None
  validate(lora)
  return LoraTuning(model_config, lora) if lora.enabled else None
