"""optax optimizers and learning-rate schedules from `OptimizerConfig`.

AdamW (LLaMA: b=(0.9, 0.95), wd 0.1, clip 1.0, 2000 warmup steps, cosine to
10% of the peak) and Adafactor as the Flan / T5X recipe uses it (decay rate
0.8, update clipping 1.0, no momentum, parameter-scaled updates, factored
second moments, constant learning rate 1e-3).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")
STATE_DTYPES = ("", "float32", "bfloat16")  # "": the param dtype (optax's default)
STATE_SHARDINGS = ("params", "data")
SCHEDULES = ("constant", "linear", "warmup_cosine", "rsqrt")
BIAS_NAMES = frozenset({"bias", "bq", "bk", "bv", "bo"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"
  learning_rate: float = 3e-4
  schedule: str = "warmup_cosine"
  warmup_steps: int = 0
  decay_steps: int = 0  # 0: the run's TrainerConfig.num_steps
  final_lr_ratio: float = 0.1  # floor of the cosine / linear decay, as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  grad_clip_norm: float = 1.0  # 0 disables global-norm clipping
  adafactor_decay_rate: float = 0.8
  adafactor_clipping_threshold: float = 1.0
  adafactor_momentum: Optional[float] = None
  adafactor_multiply_by_parameter_scale: bool = True
  adafactor_min_dim_size_to_factor: int = 128
  # Memory of the optimizer state. mu_dtype / nu_dtype: the dtype Adam's first / second moments
  # are stored in ("" = the param's; "bfloat16" halves them; the update itself is computed in
  # float32). Adafactor: mu_dtype is its momentum's dtype. state_sharding "data": every state
  # leaf also split over the mesh's `data` axis (ZeRO-1 style, where params are replicated over
  # data); "params": the state sharded as its param.
  mu_dtype: str = ""
  nu_dtype: str = ""
  state_sharding: str = "params"


def validate(config: OptimizerConfig) -> None:
  if config.name not in OPTIMIZERS:
    raise ValueError(f"OptimizerConfig.name={config.name!r} is not one of {OPTIMIZERS}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"OptimizerConfig.schedule={config.schedule!r} is not one of {SCHEDULES}")
  if config.learning_rate <= 0:
    raise ValueError(f"OptimizerConfig.learning_rate={config.learning_rate} must be > 0")
  if config.warmup_steps < 0 or config.decay_steps < 0:
    raise ValueError("OptimizerConfig.warmup_steps and decay_steps must be >= 0")
  if not 0.0 <= config.final_lr_ratio <= 1.0:
    raise ValueError(f"OptimizerConfig.final_lr_ratio={config.final_lr_ratio} must be in [0, 1]")
  for field in ("mu_dtype", "nu_dtype"):
    if getattr(config, field) not in STATE_DTYPES:
      raise ValueError(f"OptimizerConfig.{field}={getattr(config, field)!r} is not one of "
                       f"{STATE_DTYPES} ('' = the param dtype)")
  if config.name == "adafactor" and config.nu_dtype:
    raise ValueError("OptimizerConfig.nu_dtype applies to adamw; Adafactor's factored second "
                     "moments are small (leave nu_dtype '')")
  if config.state_sharding not in STATE_SHARDINGS:
    raise ValueError(f"OptimizerConfig.state_sharding={config.state_sharding!r} is not one of "
                     f"{STATE_SHARDINGS}")
  if config.grad_clip_norm < 0:
    raise ValueError(f"OptimizerConfig.grad_clip_norm={config.grad_clip_norm} must be >= 0 (0 disables)")


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> Callable[[jax.Array], jax.Array]:
  """step -> learning rate. Warmup is linear from 0; decays end at `final_lr_ratio` * peak."""
  peak = config.learning_rate
  warmup = config.warmup_steps
  total = config.decay_steps or num_steps
  floor = peak * config.final_lr_ratio
  if config.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  if config.schedule in ("warmup_cosine", "linear") and total <= warmup:
    raise ValueError(f"OptimizerConfig: decay_steps (or TrainerConfig.num_steps)={total} must exceed "
                     f"warmup_steps={warmup} for schedule {config.schedule!r}")
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=floor)
  if config.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, floor, total - warmup)],
        [warmup])
  # rsqrt (T5 pretraining): peak * sqrt(warmup / max(step, warmup)), linear warmup before.
  base = max(warmup, 1)

  def rsqrt(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = peak * step / base if warmup else peak
    return jnp.where(step < warmup, ramp, peak * jnp.sqrt(base / jnp.maximum(step, base)))
  return rsqrt


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def decays(path, config: OptimizerConfig) -> bool:
  """Weight decay applies to matrices: not to norms, biases, nor (unless asked) embeddings."""
  names = [_key_name(p) for p in path]
  if any(name.endswith("norm") for name in names):
    return False
  leaf = names[-1]
  if leaf in BIAS_NAMES or leaf.startswith("b_"):
    return False
  if names[0] == "embed" and not config.decay_embeddings:
    return False
  return True


def weight_decay_mask(params, config: OptimizerConfig):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path, config), params)


def scale_by_adam_dtypes(b1: float, b2: float, eps: float, mu_dtype: str, nu_dtype: str
                         ) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in the given dtypes ("" = the param's): the
  moments and the bias-corrected update are computed in float32 from the stored ones, then the
  moments are rounded to their storage dtype. Its state is optax.ScaleByAdamState (mu, nu keyed
  like the params, so they shard as their params)."""
  f32 = jnp.float32

  def init(params):
    zeros = lambda dtype: jax.tree.map(  # noqa: E731
        lambda p: jnp.zeros(p.shape, jnp.dtype(dtype) if dtype else p.dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(mu_dtype), nu=zeros(nu_dtype))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: b1 * m.astype(f32) + (1.0 - b1) * g.astype(f32), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v.astype(f32) + (1.0 - b2) * jnp.square(g.astype(f32)),
                      updates, state.nu)
    count = optax.safe_increment(state.count)
    c1 = 1.0 - b1 ** count.astype(f32)
    c2 = 1.0 - b2 ** count.astype(f32)
    new = jax.tree.map(lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                       updates, mu, nu)
    cast = lambda tree, old: jax.tree.map(lambda x, o: x.astype(o.dtype), tree, old)  # noqa: E731
    return new, optax.ScaleByAdamState(count=count, mu=cast(mu, state.mu), nu=cast(nu, state.nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, schedule). Gradient clipping, when on, comes first (global norm of the raw grads)."""
  validate(config)
  schedule = learning_rate_schedule(config, num_steps)
  mask = lambda params: weight_decay_mask(params, config)  # noqa: E731
  if config.name == "adamw" and not (config.mu_dtype or config.nu_dtype):
    core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=mask)
  elif config.name == "adamw":  # optax.adamw's chain, the moments in their own dtypes
    core = optax.chain(
        scale_by_adam_dtypes(config.b1, config.b2, config.eps, config.mu_dtype, config.nu_dtype),
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.scale_by_learning_rate(schedule))
  else:
    core = optax.adafactor(
        schedule, min_dim_size_to_factor=config.adafactor_min_dim_size_to_factor,
        decay_rate=config.adafactor_decay_rate,
        multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
        clipping_threshold=config.adafactor_clipping_threshold or None,
        momentum=config.adafactor_momentum,
        dtype_momentum=jnp.dtype(config.mu_dtype or "float32"),
        weight_decay_rate=config.weight_decay or None, weight_decay_mask=mask)
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core), schedule
  return core, schedule


def shard_state_over(state_shardings, abstract_state, mesh, axes=("data",)):
  """`state_shardings` with each array leaf also split over the mesh `axes` (OptimizerConfig.
  state_sharding = "data"): on its first dimension that the extra split still divides and that
  does not use those axes already. Leaves no dimension divides stay as they were; so do scalars.
  The update then runs on the shards and XLA gathers the new params (ZeRO-1)."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)

  def entries(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

  def extend(sharding, leaf):
    shape = getattr(leaf, "shape", ())
    if not axes or not isinstance(sharding, NamedSharding) or not shape:
      return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    used = {a for e in spec for a in entries(e)}
    extra = tuple(a for a in axes if a not in used)
    if not extra:
      return sharding
    size = math.prod(mesh.shape[a] for a in extra)
    for dim, entry in enumerate(spec):
      parts = math.prod(mesh.shape[a] for a in entries(entry)) * size
      if shape[dim] % parts == 0:
        spec[dim] = entries(entry) + extra
        return NamedSharding(mesh, PartitionSpec(*spec))
    return sharding

  return jax.tree.map(extend, state_shardings, abstract_state,
                      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
