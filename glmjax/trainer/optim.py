"""optax optimizers and learning-rate schedules from `OptimizerConfig`.

AdamW (LLaMA: b=(0.9, 0.95), wd 0.1, clip 1.0, 2000 warmup steps, cosine to
10% of the peak) and Adafactor as the Flan / T5X recipe uses it (decay rate
0.8, update clipping 1.0, no momentum, parameter-scaled updates, factored
second moments, constant learning rate 1e-3).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")
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


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, schedule). Gradient clipping, when on, comes first (global norm of the raw grads)."""
  validate(config)
  schedule = learning_rate_schedule(config, num_steps)
  mask = lambda params: weight_decay_mask(params, config)  # noqa: E731
  if config.name == "adamw":
    core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=mask)
  else:
    core = optax.adafactor(
        schedule, min_dim_size_to_factor=config.adafactor_min_dim_size_to_factor,
        decay_rate=config.adafactor_decay_rate,
        multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
        clipping_threshold=config.adafactor_clipping_threshold or None,
        momentum=config.adafactor_momentum,
        weight_decay_rate=config.weight_decay or None, weight_decay_mask=mask)
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core), schedule
  return core, schedule
