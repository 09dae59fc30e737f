"""RoPE scaling by name: the inverse frequencies and cos/sin factor of long-context RoPE.

`ModelConfig.rope_scaling` picks one (the base inverse frequencies are
theta_i = rope_theta^(-2i/d), d = rotary_dim, Su et al. 2021 eq. 15; s = rope_scaling_factor,
L = rope_original_length, the pretraining context):

* "none":   theta_i.
* "linear": theta_i / s -- position interpolation (Chen et al. 2023, "Extending Context Window
  of Large Language Models via Positional Interpolation", eq. 4: m -> m L / L').
* "ntk":    NTK-aware scaling (bloc97 2023; Peng et al. 2023 "YaRN" sec. 3.1 eq. 13): the base
  becomes b' = b * s^(d / (d - 2)), so the lowest frequency is interpolated by s and the highest
  is kept. It is plain RoPE with another theta (transformers' "dynamic" at the length where its
  running factor equals s; exports write it as rope_theta = b').
* "yarn":   YaRN (Peng et al. 2023, sec. 3.2-3.4, as its reference code `find_correction_range`
  and transformers `_compute_yarn_parameters` with truncate=True): dims below
  floor(d ln(L / (2 pi beta_fast)) / (2 ln b)) extrapolate, dims above
  ceil(d ln(L / (2 pi beta_slow)) / (2 ln b)) interpolate by s, a linear ramp in the dim index
  between; cos and sin are multiplied by the attention factor sqrt(1/t) = 0.1 ln s + 1 (eq. 22).
* "llama3": Llama 3.1's frequency bands (Meta `apply_scaling`, transformers
  `_compute_llama3_parameters`): wavelengths 2 pi / theta_i above L / low_freq_factor divide by
  s, below L / high_freq_factor are kept, between them a smooth mix with weight
  (L / wavelength - low) / (high - low).

ChatGLM2/3 and GLM-4's `rope_ratio` is base x ratio (THUDM modeling_chatglm.py RotaryEmbedding:
`base = base * self.rope_ratio`), i.e. rope_theta = 10000 * rope_ratio with rope_scaling "none";
`chatglm_rope_theta` is that map.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

F32 = jnp.float32
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")
# rope_scaling -> transformers `rope_parameters["rope_type"]` it is written as ("ntk" is plain
# RoPE with a larger theta, so "default").
HF_ROPE_TYPES = {"none": "default", "linear": "linear", "ntk": "default", "yarn": "yarn",
                 "llama3": "llama3"}
CHATGLM_ROPE_BASE = 10000.0


def chatglm_rope_theta(rope_ratio: float, base: float = CHATGLM_ROPE_BASE) -> float:
  """ChatGLM2/3 / GLM-4 `rope_ratio` -> rope_theta (modeling_chatglm.py: base * rope_ratio)."""
  return base * rope_ratio


def base_inv_freq(rotary_dim: int, theta: float):
  """theta^(-2i/d) in float32, i < d/2 (the same ops as layers.rope_inv_freq / transformers)."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim))


def ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
  """NTK-aware base b * s^(d / (d - 2))."""
  return theta * factor ** (rotary_dim / (rotary_dim - 2))


def yarn_correction_range(rotary_dim: int, theta: float, original_length: int, beta_fast: float,
                          beta_slow: float) -> tuple[int, int]:
  """YaRN's (low, high) dim indices: d ln(L / (2 pi beta)) / (2 ln b), floored / ceiled, clipped."""
  def dim_of(rotations):
    return rotary_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = math.floor(dim_of(beta_fast)), math.ceil(dim_of(beta_slow))
  return max(low, 0), min(high, rotary_dim - 1)


def yarn_inv_freq(rotary_dim: int, theta: float, factor: float, original_length: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0):
  """YaRN's blend of extrapolated theta_i and interpolated theta_i / s by a linear ramp."""
  low, high = yarn_correction_range(rotary_dim, theta, original_length, beta_fast, beta_slow)
  high = high + 0.001 if low == high else high  # the reference code's guard against 0 / 0
  pos_freqs = theta ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim)
  ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=F32) - low) / (high - low), 0.0, 1.0)
  extrapolation = 1.0 - ramp
  return (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def yarn_attention_factor(factor: float) -> float:
  """YaRN eq. 22: sqrt(1/t) = 0.1 ln s + 1 (1 for s <= 1)."""
  return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def llama3_inv_freq(rotary_dim: int, theta: float, factor: float, original_length: int,
                    low_freq_factor: float, high_freq_factor: float):
  """Llama 3.1 bands: long wavelengths / s, short ones kept, a smooth mix in between."""
  inv = base_inv_freq(rotary_dim, theta)
  wavelen = 2 * math.pi / inv
  low_wavelen = original_length / low_freq_factor
  high_wavelen = original_length / high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (original_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def inv_freq(config):
  """Float32 inverse frequencies [rotary_dim / 2] of `config` (a ModelConfig)."""
  kind, d, theta = config.rope_scaling, config.rotary_dim, config.rope_theta
  s, length = config.rope_scaling_factor, config.rope_original_length
  if kind == "none":
    return base_inv_freq(d, theta)
  if kind == "linear":
    return base_inv_freq(d, theta) / s
  if kind == "ntk":
    return base_inv_freq(d, ntk_theta(theta, s, d))
  if kind == "yarn":
    return yarn_inv_freq(d, theta, s, length, config.rope_beta_fast, config.rope_beta_slow)
  if kind == "llama3":
    return llama3_inv_freq(d, theta, s, length, config.rope_low_freq_factor,
                           config.rope_high_freq_factor)
  raise ValueError(f"ModelConfig.rope_scaling: {kind!r} is not one of {ROPE_SCALINGS}")


def attention_factor(config) -> float:
  """The factor cos and sin are multiplied by: YaRN's (given or 0.1 ln s + 1), else 1."""
  if config.rope_scaling != "yarn":
    return 1.0
  if config.rope_attention_factor:
    return float(config.rope_attention_factor)
  return yarn_attention_factor(config.rope_scaling_factor)


def rope_angles(positions_BL, config):
  """Float32 angles [B, L, rotary_dim / 2] = positions x inv_freq(config)."""
  inv = inv_freq(config)
  return positions_BL.astype(F32)[..., None] * inv.reshape((1,) * positions_BL.ndim + inv.shape)


def validate(config, require) -> None:
  """Field checks for ModelConfig.validate; `require(ok, field, message)` raises."""
  kind = config.rope_scaling
  require(kind in ROPE_SCALINGS, "rope_scaling", f"{kind!r} is not one of {ROPE_SCALINGS}")
  if kind == "none":
    return
  require(config.position in ("rope", "rope_2d"), "rope_scaling",
          f"{kind!r} scales RoPE but position={config.position!r}")
  require(config.rope_scaling_factor >= 1.0, "rope_scaling_factor",
          f"must be >= 1 for rope_scaling={kind!r}, got {config.rope_scaling_factor}")
  if kind == "ntk":
    require(config.rotary_dim > 2, "rotary_fraction",
            f"NTK-aware scaling needs rotary_dim > 2, got {config.rotary_dim}")
  if kind in ("yarn", "llama3"):
    require(isinstance(config.rope_original_length, int) and config.rope_original_length > 0,
            "rope_original_length",
            f"rope_scaling={kind!r} needs the pretraining context length (> 0), got "
            f"{config.rope_original_length!r}")
  if kind == "yarn":
    require(config.rope_beta_fast > config.rope_beta_slow > 0, "rope_beta_fast",
            f"YaRN needs rope_beta_fast > rope_beta_slow > 0, got {config.rope_beta_fast} and "
            f"{config.rope_beta_slow}")
    require(config.rope_attention_factor >= 0, "rope_attention_factor",
            f"must be >= 0 (0: 0.1 ln s + 1), got {config.rope_attention_factor}")
  if kind == "llama3":
    require(config.rope_high_freq_factor > config.rope_low_freq_factor > 0, "rope_high_freq_factor",
            f"Llama 3 bands need rope_high_freq_factor > rope_low_freq_factor > 0, got "
            f"{config.rope_high_freq_factor} and {config.rope_low_freq_factor}")


# --- transformers `rope_parameters` <-> ModelConfig fields -----------------------------------

def to_hf(config) -> dict:
  """transformers 5 `rope_parameters` (without partial_rotary_factor) of `config`."""
  kind = config.rope_scaling
  theta = float(ntk_theta(config.rope_theta, config.rope_scaling_factor, config.rotary_dim)
                if kind == "ntk" else config.rope_theta)
  params = {"rope_type": HF_ROPE_TYPES[kind], "rope_theta": theta}
  if kind in ("linear", "yarn", "llama3"):
    params["factor"] = float(config.rope_scaling_factor)
  if kind in ("yarn", "llama3"):
    params["original_max_position_embeddings"] = int(config.rope_original_length)
  if kind == "yarn":
    params.update(beta_fast=float(config.rope_beta_fast), beta_slow=float(config.rope_beta_slow),
                  truncate=True)
    if config.rope_attention_factor:  # else transformers computes 0.1 ln s + 1 as we do
      params["attention_factor"] = float(config.rope_attention_factor)
  if kind == "llama3":
    params.update(low_freq_factor=float(config.rope_low_freq_factor),
                  high_freq_factor=float(config.rope_high_freq_factor))
  return params


def from_hf(params: dict) -> dict:
  """ModelConfig rope-scaling fields of a transformers `rope_parameters` dict (theta aside).

  "dynamic" (a factor that follows the running length), "longrope" and YaRN's mscale /
  mscale_all_dim / truncate=False have no static equivalent here: one-line ValueError.
  """
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return {}
  if rope_type not in ("linear", "yarn", "llama3"):
    raise ValueError(f"config.json rope_parameters.rope_type={rope_type!r}: glmjax implements "
                     "default, linear, yarn and llama3 RoPE (ModelConfig.rope_scaling)")
  fields = {"rope_scaling": rope_type, "rope_scaling_factor": float(params["factor"])}
  if rope_type in ("yarn", "llama3"):
    fields["rope_original_length"] = int(params["original_max_position_embeddings"])
  if rope_type == "yarn":
    for key in ("mscale", "mscale_all_dim"):
      if params.get(key):
        raise ValueError(f"config.json rope_parameters.{key}={params[key]!r}: DeepSeek's YaRN "
                         "attention factor is not implemented (ModelConfig.rope_attention_factor)")
    if not params.get("truncate", True):
      raise ValueError("config.json rope_parameters.truncate=False: glmjax's YaRN truncates the "
                       "correction range as the paper's code (ModelConfig.rope_scaling)")
    fields.update(rope_beta_fast=float(params.get("beta_fast") or 32.0),
                  rope_beta_slow=float(params.get("beta_slow") or 1.0),
                  rope_attention_factor=float(params.get("attention_factor") or 0.0))
  if rope_type == "llama3":
    fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]))
  return fields
