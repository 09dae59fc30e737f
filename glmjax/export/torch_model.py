"""A plain PyTorch twin of `glmjax.model.forward`, for architectures no transformers class represents.

Depends on torch and the safetensors package only (no jax, no glmjax;
transformers is optional), so `glmjax export` copies this file next to the
weights as `modeling_glmjax.py` and config.json's auto_map points transformers
at it:

    model = AutoModelForCausalLM.from_pretrained("exported_dir", trust_remote_code=True)
    logits = model(tokens).logits                      # [batch, length, vocab], float32

or, with torch alone (no transformers):

    from modeling_glmjax import GLMJaxForCausalLM     # or glmjax.export.torch_model
    model = GLMJaxForCausalLM.from_pretrained("exported_dir")

It covers every `ModelConfig` combination: layernorm / rmsnorm; pre, post,
sandwich and DeepNorm placements; dense and gated FFNs; top-k MoE with
expert capacity (GShard / Switch); learned, learned 2D (GLM), sinusoidal,
RoPE (both layouts, partial), 2D RoPE (ChatGLM-6B) and ALiBi positions;
parallel blocks; tied embeddings; embedding norm; lm-head bias. Inputs follow
the glmjax batch contract (DESIGN.md section 2): `positions`,
`block_positions`, `segment_ids` and `bidirectional` are optional.

Weights keep glmjax's names and per-layer shapes (`layers.3.attn.wq` is
`params["layers"]["attn"]["wq"][3]`, [d_model, heads, head_dim]), so the
state dict is a readable table of the JAX params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

CONFIG_KEY = "glmjax_config"

# name -> (activation, gated): the same table as glmjax.model.config.FFN_KINDS.
FFN_KINDS = {
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "relu": ("relu", False),
    "silu": ("silu", False),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "swiglu": ("silu", True),
    "reglu": ("relu", True),
}

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class GLMJaxConfig:
  """The architecture fields of `glmjax.model.ModelConfig`, with the same names and defaults."""

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  ffn_dim: int = 256
  max_length: int = 128
  norm: str = "layernorm"
  norm_placement: str = "pre"
  norm_eps: float = 1e-5
  norm_bias: bool = True
  ffn: str = "gelu"
  num_experts: int = 0
  experts_top_k: int = 2
  expert_capacity_factor: float = 1.25
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  position: str = "rope"
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0
  rope_layout: str = "rotate_half"
  parallel_block: bool = False
  parallel_shared_norm: bool = True
  tie_embeddings: bool = False
  embed_norm: bool = False
  lm_head_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @classmethod
  def from_dict(cls, values: dict) -> "GLMJaxConfig":
    """Keeps the fields this module knows (training-only fields of ModelConfig are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})

  @property
  def rotary_dim(self) -> int:
    if self.position == "rope_2d":
      return self.head_dim // 2
    return int(self.head_dim * self.rotary_fraction)

  @property
  def ffn_activation(self) -> str:
    return FFN_KINDS[self.ffn][0]

  @property
  def ffn_gated(self) -> bool:
    return FFN_KINDS[self.ffn][1]

  @property
  def has_final_norm(self) -> bool:
    return self.norm_placement != "post"

  @property
  def deepnorm_alpha(self) -> float:
    return (2.0 * self.num_layers) ** 0.5


# --- Layer math (mirrors glmjax/model/layers.py) ----------------------------------------------

def layer_norm(x, scale, bias, eps):
  x32 = x.float()
  mean = x32.mean(-1, keepdim=True)
  var = (x32 - mean).square().mean(-1, keepdim=True)
  y = (x32 - mean) * torch.rsqrt(var + eps) * scale.float()
  if bias is not None:
    y = y + bias.float()
  return y.to(x.dtype)


def rms_norm(x, scale, eps):
  x32 = x.float()
  y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
  return (y * scale.float()).to(x.dtype)


def rope_angles(positions, rotary_dim: int, theta: float):
  """Float32 angles [B, L, rotary_dim/2] (Su et al. 2021, eq. 15)."""
  inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                           device=positions.device) / rotary_dim))
  return positions.float()[..., None] * inv_freq


def apply_rope(x, angles, layout: str):
  """Rotates the first 2R dims of each head of x [B, L, H, Dh]; "rotate_half" pairs i with i+R,
  "interleaved" pairs 2i with 2i+1."""
  rot = 2 * angles.shape[-1]
  sin = torch.sin(angles)[:, :, None, :]
  cos = torch.cos(angles)[:, :, None, :]
  x_rot = x[..., :rot].float()
  if layout == "rotate_half":
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
  elif layout == "interleaved":
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(x_rot.shape)
  else:
    raise ValueError(f"rope_layout {layout!r} is not 'rotate_half' or 'interleaved'")
  return torch.cat([out.to(x.dtype), x[..., rot:]], dim=-1)


def sinusoidal_embedding(positions, d_model: int):
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
  inv = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float32,
                                        device=positions.device) / d_model))
  angles = positions.float()[..., None] * inv
  return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(*positions.shape, d_model)


def alibi_slopes(num_heads: int):
  """ALiBi slopes (Press et al. 2022) as BLOOM computes them, for any head count."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base ** i for i in range(1, closest + 1)]
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes += [extra_base ** i for i in range(1, 1 + 2 * remaining, 2)]
  return torch.tensor(slopes, dtype=torch.float32)


def may_attend(q_segment_ids, k_segment_ids, k_bidirectional, q_index, k_index):
  """The batch contract's attention rule (DESIGN.md s.2), elementwise with broadcasting:
  `segment_ids[i] == segment_ids[j] != 0 and (j <= i or bidirectional[j])`.

  A copy of `glmjax.model.batch.may_attend`: this file ships alone as
  `modeling_glmjax.py` and cannot import glmjax; tests/export/test_torch_model.py
  asserts the two masks agree.
  """
  same_segment = (q_segment_ids == k_segment_ids) & (k_segment_ids != 0)
  return same_segment & ((k_index <= q_index) | (k_bidirectional != 0))


def attention_mask(segment_ids, bidirectional):
  """[B, Lq, Lk] bool: `may_attend` on the packed row indices (causality by row, not position)."""
  idx = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
  return may_attend(segment_ids[:, :, None], segment_ids[:, None, :], bidirectional[:, None, :],
                    idx[None, :, None], idx[None, None, :])


def attention(q, k, v, mask, slopes=None):
  """Softmax attention in float32 with GQA; rows that see no key return zeros.
  q [B, L, H, Dh], k/v [B, L, K, Dh], mask [B, L, L]."""
  B, L, H, Dh = q.shape
  group = H // k.shape[2]
  k = k.repeat_interleave(group, dim=2)
  v = v.repeat_interleave(group, dim=2)
  scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(Dh)
  if slopes is not None:
    idx = torch.arange(L, dtype=torch.float32, device=q.device)
    scores = scores + slopes.to(q.device)[:, None, None] * (idx[None, :] - idx[:, None])[None]
  visible = mask[:, None]
  scores = scores.masked_fill(~visible, float("-inf"))
  row_max = scores.amax(-1, keepdim=True)
  row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
  unnorm = torch.where(visible, torch.exp(scores - row_max), torch.zeros_like(scores))
  denom = unnorm.sum(-1, keepdim=True)
  probs = unnorm / torch.where(denom == 0, torch.ones_like(denom), denom)
  out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype).float(), v.float())
  return out.to(q.dtype)


# --- Modules ----------------------------------------------------------------------------------

class ParamGroup(nn.Module):
  """A named bag of parameters (glmjax's leaf names become state-dict names)."""

  def __init__(self, shapes: dict, dtype):
    super().__init__()
    for name, shape in shapes.items():
      self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))

  def has(self, name: str) -> bool:
    return name in self._parameters


def norm_shapes(config: GLMJaxConfig) -> dict:
  shapes = {"scale": (config.d_model,)}
  if config.norm == "layernorm" and config.norm_bias:
    shapes["bias"] = (config.d_model,)
  return shapes


def attention_shapes(c: GLMJaxConfig) -> dict:
  D, H, K, Dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  shapes = {"wq": (D, H, Dh), "wk": (D, K, Dh), "wv": (D, K, Dh), "wo": (H, Dh, D)}
  if c.qkv_bias:
    shapes.update(bq=(H, Dh), bk=(K, Dh), bv=(K, Dh))
  if c.attn_out_bias:
    shapes["bo"] = (D,)
  return shapes


def mlp_shapes(c: GLMJaxConfig) -> dict:
  D, F_, E = c.d_model, c.ffn_dim, c.num_experts
  lead = (E,) if E else ()
  shapes = {"w_up": lead + (D, F_), "w_down": lead + (F_, D)}
  if c.ffn_gated:
    shapes["w_gate"] = lead + (D, F_)
  if E:
    shapes["router"] = (D, E)
  if c.mlp_bias:
    shapes.update(b_up=lead + (F_,), b_down=lead + (D,))
    if c.ffn_gated:
      shapes["b_gate"] = lead + (F_,)
  return shapes


class Layer(nn.Module):

  def __init__(self, config: GLMJaxConfig, dtype):
    super().__init__()
    self.config = config
    self.attn_norm = ParamGroup(norm_shapes(config), dtype)
    self.attn = ParamGroup(attention_shapes(config), dtype)
    self.mlp = ParamGroup(mlp_shapes(config), dtype)
    if not (config.parallel_block and config.parallel_shared_norm):
      self.mlp_norm = ParamGroup(norm_shapes(config), dtype)
    if config.norm_placement == "sandwich":
      self.attn_post_norm = ParamGroup(norm_shapes(config), dtype)
      self.mlp_post_norm = ParamGroup(norm_shapes(config), dtype)

  def norm(self, group: ParamGroup, x):
    c = self.config
    if c.norm == "rmsnorm":
      return rms_norm(x, group.scale, c.norm_eps)
    return layer_norm(x, group.scale, group.bias if group.has("bias") else None, c.norm_eps)

  def self_attention(self, x, ctx):
    c, p = self.config, self.attn
    dtype = x.dtype
    q = torch.einsum("bld,dhk->blhk", x, p.wq.to(dtype))
    k = torch.einsum("bld,dhk->blhk", x, p.wk.to(dtype))
    v = torch.einsum("bld,dhk->blhk", x, p.wv.to(dtype))
    if p.has("bq"):
      q, k, v = q + p.bq.to(dtype), k + p.bk.to(dtype), v + p.bv.to(dtype)
    if c.position == "rope":
      q, k = apply_rope(q, ctx["angles"], c.rope_layout), apply_rope(k, ctx["angles"], c.rope_layout)
    elif c.position == "rope_2d":
      half = c.head_dim // 2
      q = torch.cat([apply_rope(q[..., :half], ctx["angles"], "rotate_half"),
                     apply_rope(q[..., half:], ctx["block_angles"], "rotate_half")], dim=-1)
      k = torch.cat([apply_rope(k[..., :half], ctx["angles"], "rotate_half"),
                     apply_rope(k[..., half:], ctx["block_angles"], "rotate_half")], dim=-1)
    o = attention(q, k, v, ctx["mask"], ctx.get("slopes"))
    out = torch.einsum("blhk,hkd->bld", o, p.wo.to(dtype))
    if p.has("bo"):
      out = out + p.bo.to(dtype)
    return out

  def feed_forward(self, x, ctx):
    c, p = self.config, self.mlp
    if c.num_experts:
      return moe_ffn(p, x, ctx["token_mask"], c)
    act = ACTIVATIONS[c.ffn_activation]
    dtype = x.dtype
    up = x @ p.w_up.to(dtype)
    if p.has("b_up"):
      up = up + p.b_up.to(dtype)
    if c.ffn_gated:
      gate = x @ p.w_gate.to(dtype)
      if p.has("b_gate"):
        gate = gate + p.b_gate.to(dtype)
      hidden = act(gate) * up
    else:
      hidden = act(up)
    out = hidden @ p.w_down.to(dtype)
    if p.has("b_down"):
      out = out + p.b_down.to(dtype)
    return out

  def forward(self, x, ctx):
    """One block under the configured placement (see glmjax.model.transformer.block)."""
    c = self.config
    attn = lambda h: self.self_attention(h, ctx)
    mlp = lambda h: self.feed_forward(h, ctx)
    if c.parallel_block:
      h = self.norm(self.attn_norm, x)
      h_mlp = h if c.parallel_shared_norm else self.norm(self.mlp_norm, x)
      return x + attn(h) + mlp(h_mlp)
    placement = c.norm_placement
    if placement == "pre":
      x = x + attn(self.norm(self.attn_norm, x))
      return x + mlp(self.norm(self.mlp_norm, x))
    if placement == "post":
      x = self.norm(self.attn_norm, x + attn(x))
      return self.norm(self.mlp_norm, x + mlp(x))
    if placement == "sandwich":
      x = x + self.norm(self.attn_post_norm, attn(self.norm(self.attn_norm, x)))
      return x + self.norm(self.mlp_post_norm, mlp(self.norm(self.mlp_norm, x)))
    if placement == "deepnorm":
      alpha = c.deepnorm_alpha
      h = self.norm(self.attn_norm, x)
      x = h * alpha + attn(h)
      h = self.norm(self.mlp_norm, x)
      return h * alpha + mlp(h)
    raise ValueError(f"norm_placement={placement!r} is not supported")


def moe_ffn(p: ParamGroup, x, token_mask, c: GLMJaxConfig):
  """Top-k routing with per-expert capacity C = ceil(k * T / E * capacity_factor), first choices
  before second ones, in token order; overflow and padding tokens skip the expert (GShard / Switch).
  Weights each kept expert output by its router probability, as glmjax.model.layers.moe_ffn."""
  B, L, D = x.shape
  E, k = c.num_experts, c.experts_top_k
  T = B * L
  x_TD = x.reshape(T, D)
  valid_T = token_mask.reshape(T).float()
  probs_TE = torch.softmax(x_TD.float() @ p.router.float(), dim=-1)
  top_p_TK, top_e_TK = torch.topk(probs_TE, k, dim=-1)
  capacity = max(1, math.ceil(k * T / E * c.expert_capacity_factor))
  choice_KTE = F.one_hot(top_e_TK.T, E).float() * valid_T[None, :, None]
  slot_KTE = torch.cumsum(choice_KTE.reshape(k * T, E), dim=0).reshape(k, T, E) - 1.0
  kept_KTE = choice_KTE * (slot_KTE < capacity).float()
  weight_TE = torch.einsum("kt,kte->te", top_p_TK.T, kept_KTE)
  act = ACTIVATIONS[c.ffn_activation]
  dtype = x.dtype
  out_TD = torch.zeros((T, D), dtype=torch.float32, device=x.device)
  for e in range(E):
    rows = torch.nonzero(kept_KTE[:, :, e].sum(0) > 0).squeeze(-1)
    if rows.numel() == 0:
      continue
    xe = x_TD[rows]
    up = xe @ p.w_up[e].to(dtype)
    if p.has("b_up"):
      up = up + p.b_up[e].to(dtype)
    if c.ffn_gated:
      gate = xe @ p.w_gate[e].to(dtype)
      if p.has("b_gate"):
        gate = gate + p.b_gate[e].to(dtype)
      hidden = act(gate) * up
    else:
      hidden = act(up)
    ye = hidden @ p.w_down[e].to(dtype)
    if p.has("b_down"):
      ye = ye + p.b_down[e].to(dtype)
    out_TD[rows] += weight_TE[rows, e, None] * ye.float()
  return out_TD.to(dtype).reshape(B, L, D)


# --- The model: a transformers PreTrainedModel when transformers is installed -------------------

try:  # optional: without transformers, GLMJaxForCausalLM is a plain nn.Module with the same weights
  import transformers
  from transformers.modeling_outputs import CausalLMOutput
except ImportError:
  transformers = None

  @dataclasses.dataclass
  class CausalLMOutput:
    """What this model returns of transformers' CausalLMOutput."""
    logits: torch.Tensor


if transformers is not None:

  class GLMJaxHFConfig(transformers.PretrainedConfig):
    """An export's config.json as transformers reads it (config.json's auto_map names this class
    for AutoConfig); the architecture is its `glmjax_config` entry."""
    model_type = "glmjax"
    glmjax_config: Optional[dict] = None
    tie_word_embeddings: bool = False  # the model reuses the embedding itself (no lm_head tensor)

    def __post_init__(self, **kwargs):
      c = self.glmjax
      self.vocab_size, self.hidden_size = c.vocab_size, c.d_model
      self.num_hidden_layers, self.num_attention_heads = c.num_layers, c.num_heads
      super().__post_init__(**kwargs)

    @property
    def glmjax(self) -> GLMJaxConfig:
      return GLMJaxConfig.from_dict(self.glmjax_config or {})

  _Base = transformers.PreTrainedModel
else:
  _Base = nn.Module


class GLMJaxForCausalLM(_Base):
  """`model(tokens).logits`: [batch, length, vocab] float32, as `glmjax.model.forward`.

  With transformers installed this is a PreTrainedModel: config.json's auto_map names it, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds it, and
  from_pretrained / save_pretrained take transformers' options. Without transformers it is an
  nn.Module whose `from_pretrained(dir, dtype=None)` reads the same folder. No KV cache: it scores
  whole sequences (no `generate`).
  """
  config_class = GLMJaxHFConfig if transformers is not None else None
  _no_split_modules = ["Layer"]

  def __init__(self, config, dtype: Optional[torch.dtype] = None):
    from_hf = hasattr(config, "glmjax_config")  # built by transformers (from_pretrained / from_config)
    glmjax = config.glmjax if from_hf else config
    if transformers is None:
      super().__init__()
      self.config = glmjax
    else:
      if isinstance(config, GLMJaxConfig):
        config = GLMJaxHFConfig(glmjax_config=dataclasses.asdict(config))
      super().__init__(config)
    self.glmjax = glmjax
    if dtype is None:  # transformers' from_pretrained sets the default dtype it loads in (`dtype=`)
      dtype = torch.get_default_dtype() if from_hf else DTYPES[glmjax.param_dtype]
    self._build(glmjax, dtype)
    if transformers is not None:
      self.post_init()

  def _build(self, config: GLMJaxConfig, dtype):
    D, V = config.d_model, config.vocab_size
    embed = {"embedding": (V, D)}
    # GLM's 2D tables have max_length + 1 rows (THUDM/GLM mpu/transformer.py lines 697-699);
    # glmjax.model.ModelConfig.position_table_rows says the same.
    rows = config.max_length + 1 if config.position == "learned_2d" else config.max_length
    if config.position in ("learned", "learned_2d"):
      embed["position"] = (rows, D)
    if config.position == "learned_2d":
      embed["block_position"] = (rows, D)
    self.embed = ParamGroup(embed, dtype)
    if config.embed_norm:
      self.embed_norm = ParamGroup(norm_shapes(config), dtype)
    self.layers = nn.ModuleList([Layer(config, dtype) for _ in range(config.num_layers)])
    if config.has_final_norm:
      self.final_norm = ParamGroup(norm_shapes(config), dtype)
    head = {}
    if not config.tie_embeddings:
      head["kernel"] = (D, V)
    if config.lm_head_bias:
      head["bias"] = (V,)
    if head:
      self.lm_head = ParamGroup(head, dtype)

  def _init_weights(self, module):
    """Nothing to initialise: every weight comes from the checkpoint (a new model is zeros)."""

  def _norm(self, group, x):
    c = self.glmjax
    if c.norm == "rmsnorm":
      return rms_norm(x, group.scale, c.norm_eps)
    return layer_norm(x, group.scale, group.bias if group.has("bias") else None, c.norm_eps)

  def forward(self, input_ids=None, positions=None, block_positions=None, segment_ids=None,
              bidirectional=None, attention_mask=None, *, tokens=None, **options):
    """input_ids (or tokens) [B, L] int; the optional fields follow the glmjax batch contract.
    transformers' attention_mask ([B, L], 0 = padding) stands for segment_ids when those are not
    given (one segment per row). Options transformers may pass are accepted when off."""
    unsupported = sorted(k for k, v in options.items() if v not in (None, False) and k != "return_dict")
    if unsupported:
      raise TypeError(f"GLMJaxForCausalLM.forward does not support {unsupported}: it has no KV "
                      "cache and computes no loss; it returns logits")
    tokens = input_ids if input_ids is not None else tokens
    if segment_ids is None and attention_mask is not None:
      segment_ids = (attention_mask != 0).long()
    return CausalLMOutput(logits=self.logits(tokens, positions, block_positions, segment_ids,
                                             bidirectional))

  def logits(self, tokens, positions=None, block_positions=None, segment_ids=None,
             bidirectional=None):
    """Float32 logits [B, L, V] of tokens [B, L] (see `forward`)."""
    c = self.glmjax
    B, L = tokens.shape
    if L > c.max_length:
      raise ValueError(f"length {L} exceeds max_length={c.max_length}")
    device = tokens.device
    if positions is None:
      positions = torch.arange(L, device=device).expand(B, L)
    if block_positions is None:
      block_positions = torch.zeros((B, L), dtype=torch.long, device=device)
    if segment_ids is None:
      segment_ids = torch.ones((B, L), dtype=torch.long, device=device)
    if bidirectional is None:
      bidirectional = torch.zeros((B, L), dtype=torch.long, device=device)
    compute = DTYPES[c.dtype]

    x = self.embed.embedding[tokens]
    if c.position in ("learned", "learned_2d"):
      x = x + self.embed.position[positions]
    if c.position == "learned_2d":
      x = x + self.embed.block_position[block_positions]
    if c.position == "sinusoidal":
      x = x + sinusoidal_embedding(positions, c.d_model)
    x = x.to(compute)
    if c.embed_norm:
      x = self._norm(self.embed_norm, x)

    ctx = {"mask": attention_mask(segment_ids, bidirectional), "token_mask": segment_ids != 0}
    if c.position in ("rope", "rope_2d"):
      ctx["angles"] = rope_angles(positions, c.rotary_dim, c.rope_theta)
    if c.position == "rope_2d":
      ctx["block_angles"] = rope_angles(block_positions, c.rotary_dim, c.rope_theta)
    if c.position == "alibi":
      ctx["slopes"] = alibi_slopes(c.num_heads)
    for layer in self.layers:
      x = layer(x, ctx)

    if c.has_final_norm:
      x = self._norm(self.final_norm, x)
    kernel = self.embed.embedding.T if c.tie_embeddings else self.lm_head.kernel
    logits = x.float() @ kernel.float()
    if c.lm_head_bias:
      logits = logits + self.lm_head.bias.float()
    return logits

  if transformers is None:

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None) -> "GLMJaxForCausalLM":
      """Loads `config.json` + `model.safetensors` (or a sharded index) written by `glmjax export`."""
      config = GLMJaxConfig.from_dict(read_config(path))
      model = cls(config, dtype=dtype)
      state = load_safetensors_dir(path)
      missing, unexpected = model.load_state_dict(
          {k: v.to(dtype) if dtype else v for k, v in state.items()}, strict=False)
      if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
      return model.eval()


# --- Reading an export without transformers -----------------------------------------------------

REDOWNLOAD = "re-download or re-export it"


def read_json(path: str, what: str) -> dict:
  """A JSON object; a truncated or corrupt file is a ValueError naming it and the fix."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a readable {what} (truncated?): {e}; {REDOWNLOAD}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} is not a readable {what}: not a JSON object; {REDOWNLOAD}")
  return value


def read_config(path: str) -> dict:
  """The architecture fields stored in an export's config.json."""
  filename = os.path.join(path, "config.json")
  raw = read_json(filename, "config.json")
  if CONFIG_KEY not in raw:
    raise ValueError(f"{filename} has no {CONFIG_KEY!r}: it was not written by glmjax export")
  return raw[CONFIG_KEY]


def load_safetensors_file(filename: str) -> dict:
  """{name: tensor} of one safetensors file (with the safetensors package)."""
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  if not os.path.exists(filename):
    raise ValueError(f"{filename} is missing; {REDOWNLOAD}")
  try:
    return load_file(filename)
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{filename} is not a readable safetensors file (truncated?): {e}; "
                     f"{REDOWNLOAD}") from e


def load_safetensors_dir(path: str) -> dict:
  """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` lists."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = read_json(index, "safetensors index").get("weight_map") or {}
    files = sorted(set(weight_map.values()))
  else:
    files = ["model.safetensors"]
  state = {}
  for name in files:
    state.update(load_safetensors_file(os.path.join(path, name)))
  return state
