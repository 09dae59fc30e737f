"""Float64 NumPy forwards of the GLM family's own models, on their original state dicts.

Written from the published modeling code (not from glmjax): each reads the checkpoint's tensor
names and fused layouts directly, so an importer that re-lays a tensor wrongly disagrees here.
One sequence at a time; the mask is GLM's: bidirectional over the first `prefix` tokens, causal
after (ChatGLM-6B get_masks, GLM build_mask_matrix, GLM-130B's attention mask).
"""

import math

import numpy as np


def _ln(x, sd, name, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _linear(x, sd, name, bias=True):
  y = x @ sd[f"{name}.weight"].T
  return y + sd[f"{name}.bias"] if bias else y


def gelu_tanh(x):  # ChatGLM-6B gelu_impl
  return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def gelu(x):  # torch.nn.functional.gelu (erf)
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def rotate_half_rope(x, positions, base=10000.0):
  """SAT / ChatGLM-6B apply_rotary_pos_emb_index: cat(freqs, freqs) and rotate_half on the last dim."""
  d = x.shape[-1]
  inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
  angles = np.asarray(positions, np.float64)[:, None] * inv[None, :]
  emb = np.concatenate([angles, angles], axis=-1)[:, None, :]  # [L, 1, d]
  rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
  return x * np.cos(emb) + rotated * np.sin(emb)


def attention(q, k, v, prefix):
  """q, k, v [L, H, d] -> [L, H * d]; key j visible to query i iff j <= i or j < prefix."""
  L, H, d = q.shape
  scores = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
  idx = np.arange(L)
  visible = (idx[None, :] <= idx[:, None]) | (idx[None, :] < prefix)
  scores = np.where(visible[None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("hij,jhd->ihd", probs, v).reshape(L, H * d)


def _f64(sd):
  return {k: np.asarray(v, np.float64) for k, v in sd.items()}


def chatglm6b(config, sd, tokens, positions, block_positions, prefix):
  """ChatGLM-6B modeling_chatglm.py: GLMBlock (DeepNorm alpha), SelfAttention ([np, 3 * hn] qkv,
  2D rotary on the two halves of each head), GELU MLP, final LayerNorm, untied lm_head.

  One known difference is left out on purpose: ChatGLM-6B's RotaryEmbedding rounds its
  frequencies to float16 (`inv_freq = inv_freq.half()` in __init__; the checkpoint's buffer is
  ignored by its _load_from_state_dict), which glmjax's rope_2d does not model (angle error up to
  ~5e-4 x position); this reference uses exact frequencies, as the importer's target does."""
  sd = _f64(sd)
  H, n = config["num_attention_heads"], config["num_layers"]
  alpha = (2 * n) ** 0.5
  x = sd["transformer.word_embeddings.weight"][tokens]
  for i in range(n):
    p = f"transformer.layers.{i}"
    h = _ln(x, sd, f"{p}.input_layernorm")
    qkv = _linear(h, sd, f"{p}.attention.query_key_value").reshape(len(tokens), H, -1)
    q, k, v = np.split(qkv, 3, axis=-1)
    if config.get("position_encoding_2d", True):
      half = q.shape[-1] // 2
      q = np.concatenate([rotate_half_rope(q[..., :half], positions),
                          rotate_half_rope(q[..., half:], block_positions)], axis=-1)
      k = np.concatenate([rotate_half_rope(k[..., :half], positions),
                          rotate_half_rope(k[..., half:], block_positions)], axis=-1)
    else:
      q, k = rotate_half_rope(q, positions), rotate_half_rope(k, positions)
    x = h * alpha + _linear(attention(q, k, v, prefix), sd, f"{p}.attention.dense")
    h = _ln(x, sd, f"{p}.post_attention_layernorm")
    mlp = _linear(gelu_tanh(_linear(h, sd, f"{p}.mlp.dense_h_to_4h")), sd, f"{p}.mlp.dense_4h_to_h")
    x = h * alpha + mlp
  x = _ln(x, sd, "transformer.final_layernorm")
  return x @ sd["lm_head.weight"].T


def glm_block(config, sd, tokens, positions, block_positions, prefix, g="glm."):
  """GLM-10B / GLM-Large modeling_glm.py: embeddings + position + block-position tables, pre-LN
  GLMBlock, [q; k; v] query_key_value, 4h MLP with exact GELU, logits on the word embeddings."""
  sd = _f64(sd)
  H = config["num_attention_heads"]
  x = sd[f"{g}word_embeddings.weight"][tokens] + sd[f"{g}transformer.position_embeddings.weight"][positions]
  if config.get("block_position_encoding", True):
    x = x + sd[f"{g}transformer.block_position_embeddings.weight"][block_positions]
  for i in range(config["num_layers"]):
    p = f"{g}transformer.layers.{i}"
    h = _ln(x, sd, f"{p}.input_layernorm")
    q, k, v = (t.reshape(len(tokens), H, -1)
               for t in np.split(_linear(h, sd, f"{p}.attention.query_key_value"), 3, axis=-1))
    x = x + _linear(attention(q, k, v, prefix), sd, f"{p}.attention.dense")
    h = _ln(x, sd, f"{p}.post_attention_layernorm")
    x = x + _linear(gelu(_linear(h, sd, f"{p}.mlp.dense_h_to_4h")), sd, f"{p}.mlp.dense_4h_to_h")
  x = _ln(x, sd, f"{g}transformer.final_layernorm")
  return x @ sd[f"{g}word_embeddings.weight"].T


def glm130b(config, sd, tokens, positions, prefix):
  """SAT glm130B_model.py: DeepNormWithGLUMixin.layer_forward, RotaryEmbeddingMixin (1D, whole
  head, [np, 3 * hn] qkv), GEGLU x1 * gelu(x2), FinalForwardMixin (tied)."""
  sd = _f64(sd)
  H, n = config["num_attention_heads"], config["num_layers"]
  alpha = (2 * n) ** 0.5
  x = sd["transformer.word_embeddings.weight"][tokens]
  for i in range(n):
    p = f"transformer.layers.{i}"
    h = _ln(x, sd, f"{p}.input_layernorm")
    qkv = _linear(h, sd, f"{p}.attention.query_key_value").reshape(len(tokens), H, -1)
    q, k, v = np.split(qkv, 3, axis=-1)
    q, k = rotate_half_rope(q, positions), rotate_half_rope(k, positions)
    x = h * alpha + _linear(attention(q, k, v, prefix), sd, f"{p}.attention.dense")
    h = _ln(x, sd, f"{p}.post_attention_layernorm")
    x1, x2 = np.split(_linear(h, sd, f"{p}.mlp.dense_h_to_4h"), 2, axis=-1)
    x = h * alpha + _linear(x1 * gelu(x2), sd, f"{p}.mlp.dense_4h_to_h")
  x = _ln(x, sd, "transformer.final_layernorm")
  return x @ sd["transformer.word_embeddings.weight"].T
