"""Layer functions: arrays and a few flags in, arrays out (no config objects).

Shape suffixes follow nanodo: B batch, L length, D d_model, H heads,
K kv heads, G query heads per kv head, Dh head dim, F ffn hidden, E experts,
C expert capacity, T tokens (B*L).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def bcast(w, ndim: int):
  """Prepends unit axes so `w` broadcasts against an array of rank `ndim`
  (tests run with jax_numpy_rank_promotion="raise")."""
  return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def _packed(x) -> bool:
  return hasattr(x, "dense") and not hasattr(x, "shape")


def with_prefix(x_BLKD, prefix_PKD):
  """x with its first P positions replaced by `prefix` (the same for every row): P-Tuning v2's
  per-layer prefix keys / values, already position-encoded like a KV cache entry."""
  B = x_BLKD.shape[0]
  P = prefix_PKD.shape[0]
  prefix = jnp.broadcast_to(prefix_PKD.astype(x_BLKD.dtype)[None], (B,) + prefix_PKD.shape)
  return jnp.concatenate([prefix, x_BLKD[:, P:]], axis=1)


def materialize(tree):
  """Weights held in another form (glmjax.tuning: a frozen base with LoRA adapters) as the
  dense arrays the layer functions read; plain arrays pass through. Called on one layer's slice
  inside the layer scan, so at most one layer's weights are dense at a time."""
  return jax.tree.map(lambda x: x.dense() if _packed(x) else x, tree, is_leaf=_packed)


# --- Normalisation (always computed in float32) -----------------------------------------------

def layer_norm(x, scale, bias=None, eps=1e-5):
  x32 = x.astype(F32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * bcast(scale.astype(F32), x.ndim)
  if bias is not None:
    y = y + bcast(bias.astype(F32), x.ndim)
  return y.astype(x.dtype)


def rms_norm(x, scale, eps=1e-6):
  """Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps) * scale, no centring, no shift."""
  x32 = x.astype(F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * bcast(scale.astype(F32), x.ndim)).astype(x.dtype)


def apply_norm(kind: str, params: dict, x, eps: float):
  if kind == "rmsnorm":
    return rms_norm(x, params["scale"], eps)
  return layer_norm(x, params["scale"], params.get("bias"), eps)


# --- Activations ------------------------------------------------------------------------------

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# --- Positions --------------------------------------------------------------------------------

def rope_inv_freq(rotary_dim: int, theta: float):
  """theta^(-2i/rotary_dim) for i < rotary_dim/2 (Su et al. 2021, eq. 15)."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim))


def rope_angles(positions_BL, rotary_dim: int, theta: float):
  """Float32 angles [B, L, rotary_dim/2]; positions stay exact in f32 up to 2^24."""
  return positions_BL.astype(F32)[..., None] * bcast(rope_inv_freq(rotary_dim, theta), positions_BL.ndim + 1)


def apply_rope(x_BLHD, angles_BLR, layout: str, mscale: float = 1.0):
  """Rotates the first 2R dims of each head by `angles`; the rest pass through.

  layout "rotate_half" pairs dim i with i + R (LLaMA / GPT-NeoX);
  "interleaved" pairs dims 2i and 2i+1 (ChatGLM2 / GLM-4, the RoFormer paper).
  `mscale` multiplies cos and sin (YaRN's attention factor, glmjax.model.rope_scaling).
  """
  rot = 2 * angles_BLR.shape[-1]
  sin = jnp.sin(angles_BLR)[:, :, None, :]
  cos = jnp.cos(angles_BLR)[:, :, None, :]
  if mscale != 1.0:
    sin, cos = sin * mscale, cos * mscale
  x_rot = x_BLHD[..., :rot].astype(F32)
  if layout == "rotate_half":
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif layout == "interleaved":
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_rot.shape)
  else:
    raise ValueError(f"rope layout {layout!r} is not 'rotate_half' or 'interleaved'")
  return jnp.concatenate([out.astype(x_BLHD.dtype), x_BLHD[..., rot:]], axis=-1)


def apply_rope_2d(x_BLHD, angles_pos, angles_block, mscale: float = 1.0):
  """ChatGLM-6B 2D RoPE: first half of each head rotated by `positions`,
  second half by `block_positions`, each half in rotate_half layout."""
  half = x_BLHD.shape[-1] // 2
  return jnp.concatenate([apply_rope(x_BLHD[..., :half], angles_pos, "rotate_half", mscale),
                          apply_rope(x_BLHD[..., half:], angles_block, "rotate_half", mscale)], axis=-1)


def sinusoidal_embedding(positions_BL, d_model: int):
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
  inv = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=F32) / d_model))
  angles = positions_BL.astype(F32)[..., None] * bcast(inv, positions_BL.ndim + 1)
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions_BL.shape, d_model)


def alibi_slopes(num_heads: int):
  """ALiBi head slopes (Press et al. 2022), as BLOOM computes them.

  For n a power of two: 2^(-8i/n), i = 1..n. Otherwise the slopes of the
  closest power of two below n, then every other slope of twice that power.
  """
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base ** i for i in range(1, closest + 1)]
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes += [extra_base ** i for i in range(1, 1 + 2 * remaining, 2)]
  return jnp.asarray(slopes, F32)


# --- Embedding gradient shrink ---------------------------------------------------------------

def shrink_gradient(x, alpha: float):
  """GLM-130B (sec. 3.3): forward unchanged, gradient scaled by alpha."""
  if alpha == 1.0:
    return x
  return x * alpha + jax.lax.stop_gradient(x) * (1.0 - alpha)


# --- Feed-forward -----------------------------------------------------------------------------

# Weights may carry their own `matmul_2d(x)` (glmjax.tuning.lora.LoraDropoutWeight: LoRA dropout
# masks the adapter's input, so the weight needs x); glmjax.tuning.lora.dropout_wired checks this.
INPUT_AWARE_WEIGHTS = True


def matmul_2d(x, w_2d, **kwargs):
  """x [..., K] @ w [K, N] as one [T, K] x [K, N] matmul, T = prod(leading dims).

  The same math as einsum("...k,kn->...n"), but on XLA CPU the weight gradient
  of the 2-D form is a plain dot, while the 3-D form ([B, L, K] contracted over
  B and L) gets a strided transpose fused into it: the MLP's forward + backward
  ran ~1.7x faster in 2-D on the project's CPU. The reshapes are free (bitcasts).
  """
  if hasattr(w_2d, "matmul_2d"):  # an input-aware weight (see INPUT_AWARE_WEIGHTS)
    return w_2d.matmul_2d(x, **kwargs)
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), w_2d, **kwargs).reshape(lead + (w_2d.shape[-1],))


def dense_ffn(p: dict, x_BLD, activation: str, gated: bool, dtype):
  """FFN(x) = W_down(act(x W_up)) or, gated, W_down(act(x W_gate) * (x W_up))."""
  act = ACTIVATIONS[activation]
  up = matmul_2d(x_BLD, p["w_up"].astype(dtype))
  if "b_up" in p:
    up = up + bcast(p["b_up"].astype(dtype), 3)
  if gated:
    gate = matmul_2d(x_BLD, p["w_gate"].astype(dtype))
    if "b_gate" in p:
      gate = gate + bcast(p["b_gate"].astype(dtype), 3)
    hidden = act(gate) * up
  else:
    hidden = act(up)
  out = matmul_2d(hidden, p["w_down"].astype(dtype))
  if "b_down" in p:
    out = out + bcast(p["b_down"].astype(dtype), 3)
  return out


def moe_ffn(p: dict, x_BLD, token_mask_BL, *, activation: str, gated: bool, top_k: int,
            capacity_factor: float, dtype):
  """Top-k routed mixture of experts with a per-expert capacity (GShard / Switch).

  Each token picks its k most probable experts; the expert output is weighted
  by the router probability. Every expert takes at most
  C = ceil(k * T / E * capacity_factor) tokens, first choices before second
  ones, in token order; overflow tokens skip the expert (the residual carries
  them). Padding tokens (mask 0) are not routed.
  Returns (output [B, L, D], Switch load-balancing loss E * sum_e f_e P_e).
  """
  B, L, D = x_BLD.shape
  E = p["router"].shape[-1]
  T = B * L
  x_TD = x_BLD.reshape(T, D)
  valid_T = token_mask_BL.reshape(T).astype(F32)
  logits_TE = jnp.einsum("td,de->te", x_TD.astype(F32), p["router"].astype(F32))
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  top_p_TK, top_e_TK = jax.lax.top_k(probs_TE, top_k)
  capacity = max(1, math.ceil(top_k * T / E * capacity_factor))

  choice_KTE = jax.nn.one_hot(top_e_TK.T, E, dtype=F32) * valid_T[None, :, None]
  # Slot of each (choice, token) in its expert's buffer: running count, first choices first.
  slot_KTE = jnp.cumsum(choice_KTE.reshape(top_k * T, E), axis=0).reshape(top_k, T, E) - 1.0
  kept_KTE = choice_KTE * (slot_KTE < capacity)
  slot_onehot_KTEC = jax.nn.one_hot(jnp.where(kept_KTE > 0, slot_KTE, -1).astype(jnp.int32),
                                    capacity, dtype=F32)
  dispatch_TEC = jnp.einsum("kte,ktec->tec", kept_KTE, slot_onehot_KTEC)
  combine_TEC = jnp.einsum("kt,kte,ktec->tec", top_p_TK.T, kept_KTE, slot_onehot_KTEC)

  expert_in_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC.astype(dtype), x_TD)
  act = ACTIVATIONS[activation]
  up = jnp.einsum("ecd,edf->ecf", expert_in_ECD, p["w_up"].astype(dtype))
  if "b_up" in p:
    up = up + p["b_up"].astype(dtype)[:, None]
  if gated:
    gate = jnp.einsum("ecd,edf->ecf", expert_in_ECD, p["w_gate"].astype(dtype))
    if "b_gate" in p:
      gate = gate + p["b_gate"].astype(dtype)[:, None]
    hidden = act(gate) * up
  else:
    hidden = act(up)
  expert_out_ECD = jnp.einsum("ecf,efd->ecd", hidden, p["w_down"].astype(dtype))
  if "b_down" in p:
    expert_out_ECD = expert_out_ECD + p["b_down"].astype(dtype)[:, None]
  out_TD = jnp.einsum("tec,ecd->td", combine_TEC.astype(dtype), expert_out_ECD)

  num_valid = jnp.maximum(jnp.sum(valid_T), 1.0)
  fraction_E = jnp.sum(choice_KTE, axis=(0, 1)) / (num_valid * top_k)
  mean_prob_E = jnp.sum(probs_TE * valid_T[:, None], axis=0) / num_valid
  aux_loss = E * jnp.sum(fraction_E * mean_prob_E)
  return out_TD.reshape(B, L, D), aux_loss
