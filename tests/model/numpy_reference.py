"""A slow, independent NumPy (float64) forward pass written from the papers' formulas.

It shares no code with glmjax.model: loops over layers and heads, an explicit
visibility test per (query, key) pair, textbook norms and position schemes.
"""

import math

import numpy as np


def _layernorm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + eps) * p["scale"]
  return y + p["bias"] if "bias" in p else y


def _rmsnorm(x, p, eps):
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]


def _gelu(x):
  from math import erf
  return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACT = {"gelu": _gelu, "gelu_tanh": _gelu_tanh, "relu": lambda x: np.maximum(x, 0),
       "silu": lambda x: x / (1 + np.exp(-x))}


def _rotate(vec, pos, theta, layout):
  """Rotate one head vector (length 2R) by position pos, pair by pair."""
  r = len(vec) // 2
  out = vec.copy()
  for i in range(r):
    angle = pos * theta ** (-2 * i / (2 * r))
    a, b = (i, i + r) if layout == "rotate_half" else (2 * i, 2 * i + 1)
    out[a] = vec[a] * math.cos(angle) - vec[b] * math.sin(angle)
    out[b] = vec[b] * math.cos(angle) + vec[a] * math.sin(angle)
  return out


def _alibi_slopes(n):
  def power_of_2(m):
    start = 2 ** (-(2 ** -(math.log2(m) - 3)))
    return [start * start**i for i in range(m)]
  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n - closest]


def _positions_apply(c, vec, pos, bpos):
  """Position encoding of one q or k head vector."""
  if c.position == "rope":
    rot = int(c.head_dim * c.rotary_fraction)
    return np.concatenate([_rotate(vec[:rot], pos, c.rope_theta, c.rope_layout), vec[rot:]])
  if c.position == "rope_2d":
    half = c.head_dim // 2
    return np.concatenate([_rotate(vec[:half], pos, c.rope_theta, "rotate_half"),
                           _rotate(vec[half:], bpos, c.rope_theta, "rotate_half")])
  return vec


def _attention(c, lp, x, seg, bidi, pos, bpos):
  L = x.shape[0]
  H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
  q = np.einsum("ld,dhk->lhk", x, lp["wq"])
  k = np.einsum("ld,dhk->lhk", x, lp["wk"])
  v = np.einsum("ld,dhk->lhk", x, lp["wv"])
  if "bq" in lp:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  slopes = _alibi_slopes(H) if c.position == "alibi" else None
  out = np.zeros((L, H, Dh))
  for h in range(H):
    kv = h // (H // K)
    for i in range(L):
      qi = _positions_apply(c, q[i, h], pos[i], bpos[i])
      visible = [j for j in range(L) if seg[i] == seg[j] != 0 and (j <= i or bidi[j])]
      if not visible:
        continue
      scores = []
      for j in visible:
        kj = _positions_apply(c, k[j, kv], pos[j], bpos[j])
        s = qi @ kj / math.sqrt(Dh)
        if slopes is not None:
          s += slopes[h] * (j - i)
        scores.append(s)
      w = np.exp(np.array(scores) - max(scores))
      w /= w.sum()
      out[i, h] = sum(wj * v[j, kv] for wj, j in zip(w, visible))
  y = np.einsum("lhk,hkd->ld", out, lp["wo"])
  return y + lp["bo"] if "bo" in lp else y


def _mlp(c, mp, x):
  act, gated = {"gelu": ("gelu", 0), "gelu_tanh": ("gelu_tanh", 0), "relu": ("relu", 0),
                "silu": ("silu", 0), "geglu": ("gelu", 1), "swiglu": ("silu", 1),
                "reglu": ("relu", 1)}[c.ffn]
  up = x @ mp["w_up"] + mp.get("b_up", 0)
  if gated:
    h = ACT[act](x @ mp["w_gate"] + mp.get("b_gate", 0)) * up
  else:
    h = ACT[act](up)
  return h @ mp["w_down"] + mp.get("b_down", 0)


def forward(params, batch, c):
  """Logits [B, L, V] for one tiny model; params and batch as NumPy arrays."""
  norm = (lambda x, p: _rmsnorm(x, p, c.norm_eps)) if c.norm == "rmsnorm" else (
      lambda x, p: _layernorm(x, p, c.norm_eps))
  tokens = batch["tokens"]
  B, L = tokens.shape
  out = []
  for b in range(B):
    seg, bidi = batch["segment_ids"][b], batch["bidirectional"][b]
    pos, bpos = batch["positions"][b], batch["block_positions"][b]
    x = params["embed"]["embedding"][tokens[b]].astype(np.float64)
    if c.position in ("learned", "learned_2d"):
      x = x + params["embed"]["position"][pos]
    if c.position == "learned_2d":
      x = x + params["embed"]["block_position"][bpos]
    if c.position == "sinusoidal":
      pe = np.zeros((L, c.d_model))
      for t in range(L):
        for i in range(0, c.d_model, 2):
          pe[t, i] = math.sin(pos[t] / 10000 ** (i / c.d_model))
          pe[t, i + 1] = math.cos(pos[t] / 10000 ** (i / c.d_model))
      x = x + pe
    if c.embed_norm:
      x = norm(x, params["embed_norm"])
    for layer in range(c.num_layers):
      lp = {k: v[layer] for k, v in params["layers"]["attn"].items()}
      mp = {k: v[layer] for k, v in params["layers"]["mlp"].items()}
      nrm = {name: {k: v[layer] for k, v in params["layers"][name].items()}
             for name in params["layers"] if name.endswith("norm")}
      attn = lambda h: _attention(c, lp, h, seg, bidi, pos, bpos)  # noqa: E731
      if c.parallel_block:
        h = norm(x, nrm["attn_norm"])
        h2 = h if c.parallel_shared_norm else norm(x, nrm["mlp_norm"])
        x = x + attn(h) + _mlp(c, mp, h2)
      elif c.norm_placement == "pre":
        x = x + attn(norm(x, nrm["attn_norm"]))
        x = x + _mlp(c, mp, norm(x, nrm["mlp_norm"]))
      elif c.norm_placement == "post":
        x = norm(x + attn(x), nrm["attn_norm"])
        x = norm(x + _mlp(c, mp, x), nrm["mlp_norm"])
      elif c.norm_placement == "sandwich":
        x = x + norm(attn(norm(x, nrm["attn_norm"])), nrm["attn_post_norm"])
        x = x + norm(_mlp(c, mp, norm(x, nrm["mlp_norm"])), nrm["mlp_post_norm"])
      elif c.norm_placement == "deepnorm":
        alpha = math.sqrt(2 * c.num_layers)
        h = norm(x, nrm["attn_norm"])
        x = alpha * h + attn(h)
        h = norm(x, nrm["mlp_norm"])
        x = alpha * h + _mlp(c, mp, h)
    if c.norm_placement != "post":
      x = norm(x, params["final_norm"])
    head = params["embed"]["embedding"].T if c.tie_embeddings else params["lm_head"]["kernel"]
    out.append(x @ head)
  return np.stack(out)
