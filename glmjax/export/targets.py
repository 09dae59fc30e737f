"""Which transformers class represents which `ModelConfig`, and the table of renames to it.

A `Target` answers three questions for one PyTorch architecture:
  blockers(config)    the ModelConfig fields it cannot represent (empty: exportable),
  hf_config(config)   the `config.json` that makes transformers build the same network,
  tensors(config)     one `TensorMap` per PyTorch tensor: its name and shape, the glmjax
                      leaves it is made of and the two conversions between them,
and, for import, `model_config(hf_config)`: the ModelConfig of a checkpoint that
was not written by glmjax.

Exactness tricks (each keeps the function computed bit-for-bit up to float
rounding):
  * a bias the PyTorch class always has but the glmjax model lacks is written as
    zeros (GPT-2, BLOOM, GPT-NeoX; LLaMA's single `attention_bias` switch);
  * RoPE layouts: "rotate_half" pairs head dim i with i + R/2, "interleaved"
    pairs 2i with 2i + 1, at the same frequency i. Permuting the first R output
    dims of wq and wk (and bq, bk) by [0, R/2, 1, R/2 + 1, ...] turns one layout
    into the other; q.k is unchanged because q and k are permuted alike.
  * PaLM's single shared norm of a parallel block is written twice for
    GPT-NeoX, whose parallel block has two norms of the same input.
The exact ModelConfig is also stored in `config.json` under "glmjax_config",
so importing an exported folder restores the original params bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from glmjax.model import rope_scaling
from glmjax.model.config import FFN_KINDS, ModelConfig

Path = tuple
CONFIG_KEY = "glmjax_config"

# glmjax activation -> transformers ACT2FN name (exactly the same function).
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
HF_TO_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "relu": "relu", "silu": "silu", "swish": "silu"}


class WeightMismatch(ValueError):
  """A checkpoint tensor disagrees with the config it is imported under."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One PyTorch tensor: `to_hf(*source slices)` builds it, `from_hf(tensor)` inverts it.

  `sources` are glmjax param paths; with `layer` set, each source is that layer's
  slice of the stacked leaf. `from_hf` returns {path: slice} and raises
  WeightMismatch for a tensor the config says must be zero.
  """
  name: str
  shape: tuple
  sources: tuple
  layer: Optional[int]
  to_hf: Callable[..., np.ndarray]
  from_hf: Callable[[np.ndarray], dict]


# --- Rope layout permutations -----------------------------------------------------------------

def layout_permutation(head_dim: int, rotary_dim: int, source: str, target: str):
  """Index array p with x_target = x_source[..., p], or None when the layouts agree."""
  if source == target:
    return None
  half = rotary_dim // 2
  to_interleaved = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
  perm = to_interleaved if target == "interleaved" else np.argsort(to_interleaved)
  return np.concatenate([perm, np.arange(rotary_dim, head_dim)])


def _permute(x, perm):
  return x if perm is None else x[..., perm]


def _unpermute(x, perm):
  return x if perm is None else x[..., np.argsort(perm)]


# --- Building blocks of the tables ------------------------------------------------------------

def ffn_name(activation: str, gated: bool) -> str:
  for name, kind in FFN_KINDS.items():
    if kind == (activation, gated):
      return name
  raise AssertionError((activation, gated))


def hf_activation(name: str, field: str) -> str:
  if name not in HF_TO_ACT:
    raise ValueError(f"config.json {field}={name!r} has no glmjax equivalent; supported: "
                     f"{sorted(HF_TO_ACT)}")
  return HF_TO_ACT[name]


class Tables:
  """Constructors of TensorMaps for one config (shapes and dtype come from it)."""

  def __init__(self, config: ModelConfig):
    self.c = config

  def zeros(self, name, shape, layer=None, field=""):
    """A tensor the PyTorch class always has and this glmjax config does not: written as zeros."""
    dtype = _np_dtype(self.c.param_dtype)

    def check(x):
      if np.any(np.asarray(x) != 0):
        raise WeightMismatch(f"{name} is nonzero but ModelConfig.{field} is False; this tensor only "
                             "exists as zeros in a glmjax export")
      return {}
    return TensorMap(name, tuple(shape), (), layer, lambda: np.zeros(shape, dtype), check)

  def same(self, name, path, shape, layer=None):
    return TensorMap(name, tuple(shape), (path,), layer, lambda x: x, lambda x: {path: x})

  def transposed(self, name, path, shape, layer=None):
    """glmjax [in, out] <-> torch.nn.Linear [out, in]."""
    return TensorMap(name, tuple(shape), (path,), layer, lambda x: x.T, lambda x: {path: x.T})

  def heads_in(self, name, path, num_heads, layer, perm=None):
    """wq/wk/wv [D, N, Dh] <-> Linear weight [N*Dh, D]."""
    D, Dh = self.c.d_model, self.c.head_dim
    return TensorMap(name, (num_heads * Dh, D), (path,), layer,
                     lambda w: _permute(w, perm).reshape(D, num_heads * Dh).T,
                     lambda w: {path: _unpermute(w.T.reshape(D, num_heads, Dh), perm)})

  def heads_bias(self, name, path, num_heads, layer, perm=None):
    Dh = self.c.head_dim
    return TensorMap(name, (num_heads * Dh,), (path,), layer,
                     lambda b: _permute(b, perm).reshape(-1),
                     lambda b: {path: _unpermute(b.reshape(num_heads, Dh), perm)})

  def heads_out(self, name, path, layer):
    """wo [H, Dh, D] <-> Linear weight [D, H*Dh]."""
    H, Dh, D = self.c.num_heads, self.c.head_dim, self.c.d_model
    return TensorMap(name, (D, H * Dh), (path,), layer,
                     lambda w: w.reshape(H * Dh, D).T,
                     lambda w: {path: w.T.reshape(H, Dh, D)})

  def norm(self, prefix, path, layer=None, bias_name="bias", weight_name="weight"):
    """Scale (and the LayerNorm shift, zeros when the config has none) of one norm."""
    c, D = self.c, self.c.d_model
    maps = [self.same(f"{prefix}.{weight_name}", path + ("scale",), (D,), layer)]
    if bias_name is not None:
      if c.norm_bias:
        maps.append(self.same(f"{prefix}.{bias_name}", path + ("bias",), (D,), layer))
      else:
        maps.append(self.zeros(f"{prefix}.{bias_name}", (D,), layer, "norm_bias"))
    return maps

  def embedding(self, name):
    c = self.c
    return self.same(name, ("embed", "embedding"), (c.vocab_size, c.d_model))

  def lm_head(self, name="lm_head.weight"):
    """The untied output projection; tied models have none (transformers ties it itself)."""
    c = self.c
    if c.tie_embeddings:
      return []
    return [self.transposed(name, ("lm_head", "kernel"), (c.vocab_size, c.d_model))]

  def fused_qkv_per_head(self, name, layer, perm, with_bias: bool):
    """BLOOM / GPT-NeoX `query_key_value`: output features ordered [head, (q, k, v), Dh]."""
    c = self.c
    D, H, Dh = c.d_model, c.num_heads, c.head_dim
    paths = tuple(("layers", "attn", w) for w in ("wq", "wk", "wv"))

    def to_hf(wq, wk, wv):
      return np.stack([_permute(wq, perm), _permute(wk, perm), wv], axis=2).reshape(D, 3 * H * Dh).T

    def from_hf(w):
      w = w.T.reshape(D, H, 3, Dh)
      return {paths[0]: _unpermute(w[:, :, 0], perm), paths[1]: _unpermute(w[:, :, 1], perm),
              paths[2]: np.ascontiguousarray(w[:, :, 2])}

    maps = [TensorMap(f"{name}.weight", (3 * H * Dh, D), paths, layer, to_hf, from_hf)]
    if not with_bias:
      return maps
    if c.qkv_bias:
      bpaths = tuple(("layers", "attn", b) for b in ("bq", "bk", "bv"))

      def bias_to_hf(bq, bk, bv):
        return np.stack([_permute(bq, perm), _permute(bk, perm), bv], axis=1).reshape(-1)

      def bias_from_hf(b):
        b = b.reshape(H, 3, Dh)
        return {bpaths[0]: _unpermute(b[:, 0], perm), bpaths[1]: _unpermute(b[:, 1], perm),
                bpaths[2]: np.ascontiguousarray(b[:, 2])}
      maps.append(TensorMap(f"{name}.bias", (3 * H * Dh,), bpaths, layer, bias_to_hf, bias_from_hf))
    else:
      maps.append(self.zeros(f"{name}.bias", (3 * H * Dh,), layer, "qkv_bias"))
    return maps

  def separate_qkvo(self, prefix, layer, perm, qkv_bias: bool, o_bias: bool):
    """LLaMA-style q_proj / k_proj / v_proj / o_proj. `qkv_bias` / `o_bias`: the PyTorch
    class has those biases (zeros where the glmjax config has none)."""
    c = self.c
    H, K, Dh, D = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
    a = ("layers", "attn")
    maps = [self.heads_in(f"{prefix}.q_proj.weight", a + ("wq",), H, layer, perm),
            self.heads_in(f"{prefix}.k_proj.weight", a + ("wk",), K, layer, perm),
            self.heads_in(f"{prefix}.v_proj.weight", a + ("wv",), K, layer),
            self.heads_out(f"{prefix}.o_proj.weight", a + ("wo",), layer)]
    if qkv_bias:
      for proj, path, heads, p in (("q", "bq", H, perm), ("k", "bk", K, perm), ("v", "bv", K, None)):
        name = f"{prefix}.{proj}_proj.bias"
        if c.qkv_bias:
          maps.append(self.heads_bias(name, a + (path,), heads, layer, p))
        else:
          maps.append(self.zeros(name, (heads * Dh,), layer, "qkv_bias"))
    if o_bias:
      name = f"{prefix}.o_proj.bias"
      maps.append(self.same(name, a + ("bo",), (D,), layer) if c.attn_out_bias
                  else self.zeros(name, (D,), layer, "attn_out_bias"))
    return maps

  def mlp_linear(self, name, path, layer, with_bias: bool, bias_path=None, bias_field="mlp_bias"):
    """An FFN matrix [in, out] as a Linear weight, plus its bias (zeros if the config has none)."""
    c = self.c
    D, Fd = c.d_model, c.ffn_dim
    out_dim = D if path[-1] == "w_down" else Fd
    in_dim = Fd if path[-1] == "w_down" else D
    maps = [self.transposed(f"{name}.weight", path, (out_dim, in_dim), layer)]
    if with_bias:
      maps.append(self.same(f"{name}.bias", bias_path, (out_dim,), layer) if c.mlp_bias
                  else self.zeros(f"{name}.bias", (out_dim,), layer, bias_field))
    return maps


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# --- Targets ----------------------------------------------------------------------------------

class Blockers:
  """Collects 'ModelConfig.field=value: why' messages."""

  def __init__(self, config: ModelConfig, architecture: str):
    self.c, self.architecture, self.items = config, architecture, []

  def require(self, ok: bool, field: str, why: str):
    if not ok:
      value = getattr(self.c, field) if hasattr(self.c, field) else None
      self.items.append(f"ModelConfig.{field}={value!r}: {why}")

  def common(self, rope_scaling: bool = False):
    """Nothing in transformers routes tokens to experts with glmjax's capacity rule; RoPE scaling
    only where the target writes it (`rope_scaling`: LLaMA, GLM-4)."""
    c = self.c
    self.require(rope_scaling or c.rope_scaling == "none", "rope_scaling",
                 f"the {self.architecture} export writes plain RoPE only")
    self.require(c.num_experts == 0, "num_experts",
                 f"{self.architecture} has no mixture-of-experts layers with capacity-limited top-k routing")
    self.require(not c.lm_head_bias, "lm_head_bias", f"{self.architecture} has no lm-head bias")


def rope_scaling_fields(hf) -> dict:
  """ModelConfig rope-scaling fields of a transformers config (glmjax.model.rope_scaling.from_hf)."""
  return rope_scaling.from_hf(dict(getattr(hf, "rope_parameters", None) or {}))


def rope_parameters(hf, scaled: bool = False) -> tuple[float, float]:
  """(theta, partial_rotary_factor) of a transformers config; only plain RoPE is exact here
  unless `scaled` (the caller reads the scaling with rope_scaling_fields)."""
  params = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = params.get("rope_type", "default")
  if rope_type != "default" and not scaled:
    raise ValueError(f"config.json rope_parameters.rope_type={rope_type!r}: glmjax implements plain RoPE "
                     "only; RoPE scaling (linear, dynamic, yarn, llama3) would change the logits")
  theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
  fraction = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
  return float(theta), float(fraction)


def _rope_json(config: ModelConfig, with_fraction: bool, legacy_fraction_key: str = "") -> dict:
  """transformers 5 `rope_parameters`, plus the top-level keys transformers 4 read instead."""
  params = rope_scaling.to_hf(config)
  if with_fraction:
    params["partial_rotary_factor"] = float(config.rotary_fraction)
  out = {"rope_parameters": params, "rope_theta": params["rope_theta"]}
  if legacy_fraction_key:
    out[legacy_fraction_key] = float(config.rotary_fraction)
  return out


class Target:
  name: str = ""
  architecture: str = ""
  model_type: str = ""

  def blockers(self, config: ModelConfig) -> list[str]:
    raise NotImplementedError

  def hf_config(self, config: ModelConfig) -> dict:
    raise NotImplementedError

  def tensors(self, config: ModelConfig) -> list[TensorMap]:
    raise NotImplementedError

  def model_config(self, hf) -> ModelConfig:
    raise NotImplementedError


class Llama(Target):
  """LlamaForCausalLM: RMSNorm pre-norm, gated FFN, full RoPE, GQA, optional biases."""
  name, architecture, model_type = "llama", "LlamaForCausalLM", "llama"
  layout = "rotate_half"

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common(rope_scaling=True)
    b.require(c.norm == "rmsnorm", "norm", "LLaMA uses RMSNorm")
    b.require(c.norm_placement == "pre", "norm_placement", "LLaMA is pre-norm")
    b.require(not c.parallel_block, "parallel_block", "LLaMA blocks are sequential")
    b.require(c.ffn_gated, "ffn", "LLaMA's MLP is gated (swiglu, geglu, geglu_tanh, reglu)")
    b.require(c.position == "rope", "position", "LLaMA uses RoPE")
    b.require(c.rotary_fraction == 1.0, "rotary_fraction", "LLaMA rotates the whole head")
    b.require(not c.embed_norm, "embed_norm", "LLaMA has no embedding norm")
    b.require(c.d_model % c.num_heads == 0, "d_model",
              f"LlamaConfig requires hidden_size divisible by num_attention_heads={c.num_heads}")
    return b.items

  def hf_config(self, c):
    return {
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": ACT_TO_HF[c.ffn_activation],
        "max_position_embeddings": c.max_length, "rms_norm_eps": c.norm_eps,
        "attention_bias": c.qkv_bias or c.attn_out_bias, "mlp_bias": c.mlp_bias,
        "tie_word_embeddings": c.tie_embeddings, "vocab_size": c.vocab_size,
        "pretraining_tp": 1, **_rope_json(c, False)}

  def tensors(self, c):
    t = Tables(c)
    perm = layout_permutation(c.head_dim, c.rotary_dim, c.rope_layout, self.layout)
    bias = c.qkv_bias or c.attn_out_bias
    maps = [t.embedding("model.embed_tokens.weight")]
    for i in range(c.num_layers):
      p = f"model.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i, bias_name=None)
      maps += t.separate_qkvo(f"{p}.self_attn", i, perm, bias, bias)
      maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i, bias_name=None)
      m = ("layers", "mlp")
      maps += t.mlp_linear(f"{p}.mlp.gate_proj", m + ("w_gate",), i, c.mlp_bias, m + ("b_gate",))
      maps += t.mlp_linear(f"{p}.mlp.up_proj", m + ("w_up",), i, c.mlp_bias, m + ("b_up",))
      maps += t.mlp_linear(f"{p}.mlp.down_proj", m + ("w_down",), i, c.mlp_bias, m + ("b_down",))
    maps += t.norm("model.norm", ("final_norm",), bias_name=None)
    return maps + t.lm_head()

  def model_config(self, hf):
    theta, fraction = rope_parameters(hf, scaled=True)
    if fraction != 1.0:
      raise ValueError(f"{self.architecture} config has partial_rotary_factor={fraction}, which "
                       "LlamaForCausalLM ignores; refusing an ambiguous checkpoint")
    act = hf_activation(hf.hidden_act, "hidden_act")
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_dim=hf.intermediate_size, max_length=hf.max_position_embeddings,
        norm="rmsnorm", norm_placement="pre", norm_eps=hf.rms_norm_eps, ffn=ffn_name(act, True),
        qkv_bias=hf.attention_bias, attn_out_bias=hf.attention_bias, mlp_bias=hf.mlp_bias,
        position="rope", rope_theta=theta, rope_layout=self.layout,
        tie_embeddings=hf.tie_word_embeddings,
        **rope_scaling_fields(hf))


class Glm(Target):
  """GlmForCausalLM (GLM-4 / ChatGLM2-3 layout): RMSNorm, fused gate_up SwiGLU-style MLP, partial
  interleaved RoPE, GQA, qkv bias, no output or MLP bias. With sandwich norms: Glm4ForCausalLM."""
  name, architecture, model_type = "glm", "GlmForCausalLM", "glm"
  layout = "interleaved"

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common(rope_scaling=True)
    b.require(c.norm == "rmsnorm", "norm", "GLM-4 uses RMSNorm")
    b.require(c.norm_placement in ("pre", "sandwich"), "norm_placement",
              "GlmForCausalLM is pre-norm and Glm4ForCausalLM sandwich-norm")
    b.require(not c.parallel_block, "parallel_block", "GLM-4 blocks are sequential")
    b.require(c.ffn_gated, "ffn", "GLM-4's MLP is gated (gate_up_proj)")
    b.require(not c.mlp_bias, "mlp_bias", "GLM-4's MLP has no biases")
    b.require(not c.attn_out_bias, "attn_out_bias", "GLM-4's o_proj has no bias")
    b.require(c.position == "rope", "position", "GLM-4 uses RoPE")
    b.require(not c.embed_norm, "embed_norm", "GLM-4 has no embedding norm")
    return b.items

  def _sandwich(self, c):
    return c.norm_placement == "sandwich"

  def architecture_for(self, c):
    return "Glm4ForCausalLM" if self._sandwich(c) else "GlmForCausalLM"

  def model_type_for(self, c):
    return "glm4" if self._sandwich(c) else "glm"

  def hf_config(self, c):
    return {
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": ACT_TO_HF[c.ffn_activation],
        "max_position_embeddings": c.max_length, "rms_norm_eps": c.norm_eps,
        "attention_bias": c.qkv_bias, "tie_word_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size, **_rope_json(c, True, "partial_rotary_factor")}

  def tensors(self, c):
    t = Tables(c)
    perm = layout_permutation(c.head_dim, c.rotary_dim, c.rope_layout, self.layout)
    D, Fd = c.d_model, c.ffn_dim
    maps = [t.embedding("model.embed_tokens.weight")]
    gate_up = (("layers", "mlp", "w_gate"), ("layers", "mlp", "w_up"))
    for i in range(c.num_layers):
      p = f"model.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i, bias_name=None)
      maps += t.separate_qkvo(f"{p}.self_attn", i, perm, c.qkv_bias, False)
      maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i, bias_name=None)
      if self._sandwich(c):
        maps += t.norm(f"{p}.post_self_attn_layernorm", ("layers", "attn_post_norm"), i, bias_name=None)
        maps += t.norm(f"{p}.post_mlp_layernorm", ("layers", "mlp_post_norm"), i, bias_name=None)
      maps.append(TensorMap(
          f"{p}.mlp.gate_up_proj.weight", (2 * Fd, D), gate_up, i,
          lambda gate, up: np.concatenate([gate.T, up.T], axis=0),
          lambda w: {gate_up[0]: w[:Fd].T, gate_up[1]: w[Fd:].T}))
      maps += t.mlp_linear(f"{p}.mlp.down_proj", ("layers", "mlp", "w_down"), i, False)
    maps += t.norm("model.norm", ("final_norm",), bias_name=None)
    return maps + t.lm_head()

  def model_config(self, hf):
    theta, fraction = rope_parameters(hf, scaled=True)
    act = hf_activation(hf.hidden_act, "hidden_act")
    sandwich = getattr(hf, "model_type", "glm") == "glm4"
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_dim=hf.intermediate_size, max_length=hf.max_position_embeddings,
        norm="rmsnorm", norm_placement="sandwich" if sandwich else "pre", norm_eps=hf.rms_norm_eps,
        ffn=ffn_name(act, True), qkv_bias=hf.attention_bias, position="rope", rope_theta=theta,
        rotary_fraction=fraction, rope_layout=self.layout, tie_embeddings=hf.tie_word_embeddings,
        **rope_scaling_fields(hf))


class Cohere(Target):
  """CohereForCausalLM: PaLM's block (one bias-free LayerNorm feeding attention and a gated MLP in
  parallel), interleaved full RoPE, GQA/MQA, tied embeddings. logit_scale is set to 1."""
  name, architecture, model_type = "cohere", "CohereForCausalLM", "cohere"
  layout = "interleaved"

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common()
    b.require(c.norm == "layernorm", "norm", "Cohere uses LayerNorm")
    b.require(not c.norm_bias, "norm_bias", "Cohere's LayerNorm has no bias (norm_bias=False, as PaLM)")
    b.require(c.parallel_block, "parallel_block", "Cohere blocks are parallel (PaLM style)")
    b.require(c.parallel_shared_norm, "parallel_shared_norm",
              "Cohere feeds attention and MLP from one shared norm")
    b.require(c.ffn_gated, "ffn", "Cohere's MLP is gated")
    b.require(not c.mlp_bias, "mlp_bias", "Cohere's MLP has no biases")
    b.require(c.position == "rope", "position", "Cohere uses RoPE")
    b.require(c.rotary_fraction == 1.0, "rotary_fraction", "Cohere rotates the whole head")
    b.require(not c.embed_norm, "embed_norm", "Cohere has no embedding norm")
    b.require(c.d_model == c.num_heads * c.head_dim, "head_dim",
              f"Cohere derives head_dim = d_model / num_heads = {c.d_model / c.num_heads:g}")
    return b.items

  def hf_config(self, c):
    return {
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "hidden_act": ACT_TO_HF[c.ffn_activation], "max_position_embeddings": c.max_length,
        "layer_norm_eps": c.norm_eps, "attention_bias": c.qkv_bias or c.attn_out_bias,
        "logit_scale": 1.0, "use_qk_norm": False, "tie_word_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size, **_rope_json(c, False)}

  def tensors(self, c):
    t = Tables(c)
    perm = layout_permutation(c.head_dim, c.rotary_dim, c.rope_layout, self.layout)
    bias = c.qkv_bias or c.attn_out_bias
    maps = [t.embedding("model.embed_tokens.weight")]
    m = ("layers", "mlp")
    for i in range(c.num_layers):
      p = f"model.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i, bias_name=None)
      maps += t.separate_qkvo(f"{p}.self_attn", i, perm, bias, bias)
      maps += t.mlp_linear(f"{p}.mlp.gate_proj", m + ("w_gate",), i, False)
      maps += t.mlp_linear(f"{p}.mlp.up_proj", m + ("w_up",), i, False)
      maps += t.mlp_linear(f"{p}.mlp.down_proj", m + ("w_down",), i, False)
    maps += t.norm("model.norm", ("final_norm",), bias_name=None)
    return maps + t.lm_head()

  def model_config(self, hf):
    theta, _ = rope_parameters(hf)
    if getattr(hf, "use_qk_norm", False):
      raise ValueError("config.json use_qk_norm=True: glmjax has no query/key norm")
    if float(getattr(hf, "logit_scale", 1.0) or 1.0) != 1.0:
      raise ValueError(f"config.json logit_scale={hf.logit_scale}: glmjax has no logit scale; "
                       "fold it into the lm head / embeddings first")
    act = hf_activation(hf.hidden_act, "hidden_act")
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.hidden_size // hf.num_attention_heads, ffn_dim=hf.intermediate_size,
        max_length=hf.max_position_embeddings, norm="layernorm", norm_bias=False,
        norm_eps=hf.layer_norm_eps, ffn=ffn_name(act, True), qkv_bias=hf.attention_bias,
        attn_out_bias=hf.attention_bias, position="rope", rope_theta=theta,
        rope_layout=self.layout, parallel_block=True, parallel_shared_norm=True,
        tie_embeddings=hf.tie_word_embeddings)


class GPTNeoX(Target):
  """GPTNeoXForCausalLM: LayerNorm, dense MLP with biases, partial rotate_half RoPE, MHA; blocks
  parallel with two norms (use_parallel_residual) or sequential pre-norm."""
  name, architecture, model_type = "gpt_neox", "GPTNeoXForCausalLM", "gpt_neox"
  layout = "rotate_half"

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common()
    b.require(c.norm == "layernorm", "norm", "GPT-NeoX uses LayerNorm")
    b.require(c.norm_placement == "pre", "norm_placement", "GPT-NeoX is pre-norm")
    b.require(not c.ffn_gated, "ffn", "GPT-NeoX's MLP is not gated (gelu, gelu_tanh, relu, silu)")
    b.require(c.position == "rope", "position", "GPT-NeoX uses RoPE")
    b.require(c.num_kv_heads == c.num_heads, "num_kv_heads", "GPT-NeoX has no grouped-query attention")
    b.require(c.d_model == c.num_heads * c.head_dim, "head_dim",
              f"GPT-NeoX derives head_dim = d_model / num_heads = {c.d_model / c.num_heads:g}")
    b.require(not c.embed_norm, "embed_norm", "GPT-NeoX has no embedding norm")
    return b.items

  def hf_config(self, c):
    return {
        "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "hidden_act": ACT_TO_HF[c.ffn_activation],
        "max_position_embeddings": c.max_length, "layer_norm_eps": c.norm_eps,
        "attention_bias": c.qkv_bias or c.attn_out_bias, "use_parallel_residual": c.parallel_block,
        "tie_word_embeddings": c.tie_embeddings, "vocab_size": c.vocab_size,
        "rotary_emb_base": float(c.rope_theta), **_rope_json(c, True, "rotary_pct")}

  def tensors(self, c):
    t = Tables(c)
    perm = layout_permutation(c.head_dim, c.rotary_dim, c.rope_layout, self.layout)
    bias = c.qkv_bias or c.attn_out_bias
    m = ("layers", "mlp")
    maps = [t.embedding("gpt_neox.embed_in.weight")]
    for i in range(c.num_layers):
      p = f"gpt_neox.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i)
      shared = c.parallel_block and c.parallel_shared_norm
      maps += t.norm(f"{p}.post_attention_layernorm",
                     ("layers", "attn_norm" if shared else "mlp_norm"), i)
      maps += t.fused_qkv_per_head(f"{p}.attention.query_key_value", i, perm, bias)
      maps.append(t.heads_out(f"{p}.attention.dense.weight", ("layers", "attn", "wo"), i))
      if bias:
        D = c.d_model
        maps.append(t.same(f"{p}.attention.dense.bias", ("layers", "attn", "bo"), (D,), i)
                    if c.attn_out_bias else t.zeros(f"{p}.attention.dense.bias", (D,), i, "attn_out_bias"))
      maps += t.mlp_linear(f"{p}.mlp.dense_h_to_4h", m + ("w_up",), i, True, m + ("b_up",))
      maps += t.mlp_linear(f"{p}.mlp.dense_4h_to_h", m + ("w_down",), i, True, m + ("b_down",))
    maps += t.norm("gpt_neox.final_layer_norm", ("final_norm",))
    return maps + t.lm_head("embed_out.weight")

  def model_config(self, hf):
    theta, fraction = rope_parameters(hf)
    act = hf_activation(hf.hidden_act, "hidden_act")
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_attention_heads,
        head_dim=hf.hidden_size // hf.num_attention_heads, ffn_dim=hf.intermediate_size,
        max_length=hf.max_position_embeddings, norm="layernorm", norm_eps=hf.layer_norm_eps,
        ffn=ffn_name(act, False), qkv_bias=hf.attention_bias, attn_out_bias=hf.attention_bias,
        mlp_bias=True, position="rope", rope_theta=theta, rotary_fraction=fraction,
        rope_layout=self.layout, parallel_block=hf.use_parallel_residual,
        parallel_shared_norm=False, tie_embeddings=hf.tie_word_embeddings)


class GPT2(Target):
  """GPT2LMHeadModel: LayerNorm pre-norm, learned positions, dense MLP, MHA, Conv1D weights
  ([in, out]), every bias present."""
  name, architecture, model_type = "gpt2", "GPT2LMHeadModel", "gpt2"
  activations = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common()
    b.require(c.norm == "layernorm", "norm", "GPT-2 uses LayerNorm")
    b.require(c.norm_placement == "pre", "norm_placement", "GPT-2 is pre-norm")
    b.require(not c.parallel_block, "parallel_block", "GPT-2 blocks are sequential")
    b.require(not c.ffn_gated, "ffn", "GPT-2's MLP is not gated")
    b.require(c.position == "learned", "position", "GPT-2 uses learned absolute positions")
    b.require(c.num_kv_heads == c.num_heads, "num_kv_heads", "GPT-2 has no grouped-query attention")
    b.require(c.d_model == c.num_heads * c.head_dim, "head_dim",
              f"GPT-2 derives head_dim = d_model / num_heads = {c.d_model / c.num_heads:g}")
    b.require(not c.embed_norm, "embed_norm", "GPT-2 has no embedding norm")
    return b.items

  def hf_config(self, c):
    return {
        "n_embd": c.d_model, "n_inner": c.ffn_dim, "n_layer": c.num_layers, "n_head": c.num_heads,
        "n_positions": c.max_length, "activation_function": self.activations[c.ffn_activation],
        "layer_norm_epsilon": c.norm_eps, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

  def tensors(self, c):
    t = Tables(c)
    D = c.d_model
    a, m = ("layers", "attn"), ("layers", "mlp")
    maps = [t.embedding("transformer.wte.weight"),
            t.same("transformer.wpe.weight", ("embed", "position"), (c.max_length, D))]
    qkv = (a + ("wq",), a + ("wk",), a + ("wv",))
    bqkv = (a + ("bq",), a + ("bk",), a + ("bv",))
    for i in range(c.num_layers):
      p = f"transformer.h.{i}"
      maps += t.norm(f"{p}.ln_1", ("layers", "attn_norm"), i)
      maps.append(TensorMap(
          f"{p}.attn.c_attn.weight", (D, 3 * D), qkv, i,
          lambda wq, wk, wv: np.concatenate([w.reshape(D, D) for w in (wq, wk, wv)], axis=1),
          lambda w: {path: w[:, j * D:(j + 1) * D].reshape(D, c.num_heads, c.head_dim)
                     for j, path in enumerate(qkv)}))
      if c.qkv_bias:
        maps.append(TensorMap(
            f"{p}.attn.c_attn.bias", (3 * D,), bqkv, i,
            lambda bq, bk, bv: np.concatenate([b.reshape(D) for b in (bq, bk, bv)]),
            lambda b: {path: b[j * D:(j + 1) * D].reshape(c.num_heads, c.head_dim)
                       for j, path in enumerate(bqkv)}))
      else:
        maps.append(t.zeros(f"{p}.attn.c_attn.bias", (3 * D,), i, "qkv_bias"))
      maps.append(TensorMap(f"{p}.attn.c_proj.weight", (D, D), (a + ("wo",),), i,
                            lambda w: w.reshape(D, D),
                            lambda w: {a + ("wo",): w.reshape(c.num_heads, c.head_dim, D)}))
      maps.append(t.same(f"{p}.attn.c_proj.bias", a + ("bo",), (D,), i) if c.attn_out_bias
                  else t.zeros(f"{p}.attn.c_proj.bias", (D,), i, "attn_out_bias"))
      maps += t.norm(f"{p}.ln_2", ("layers", "mlp_norm"), i)
      for hf_name, w, bias in (("c_fc", "w_up", "b_up"), ("c_proj", "w_down", "b_down")):
        shape = (D, c.ffn_dim) if w == "w_up" else (c.ffn_dim, D)
        maps.append(t.same(f"{p}.mlp.{hf_name}.weight", m + (w,), shape, i))
        maps.append(t.same(f"{p}.mlp.{hf_name}.bias", m + (bias,), shape[1:], i) if c.mlp_bias
                    else t.zeros(f"{p}.mlp.{hf_name}.bias", shape[1:], i, "mlp_bias"))
    maps += t.norm("transformer.ln_f", ("final_norm",))
    return maps + t.lm_head()

  def model_config(self, hf):
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "add_cross_attention", False):
      raise ValueError("config.json scale_attn_by_inverse_layer_idx / add_cross_attention: "
                       "no glmjax equivalent")
    if not getattr(hf, "scale_attn_weights", True):
      raise ValueError("config.json scale_attn_weights=False: glmjax always scales by 1/sqrt(head_dim)")
    act = hf_activation(hf.activation_function, "activation_function")
    D, H = hf.n_embd, hf.n_head
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=D, num_layers=hf.n_layer, num_heads=H, num_kv_heads=H,
        head_dim=D // H, ffn_dim=hf.n_inner or 4 * D, max_length=hf.n_positions, norm="layernorm",
        norm_eps=hf.layer_norm_epsilon, ffn=ffn_name(act, False), qkv_bias=True, attn_out_bias=True,
        mlp_bias=True, position="learned", tie_embeddings=hf.tie_word_embeddings)


class Bloom(Target):
  """BloomForCausalLM: embedding LayerNorm, ALiBi, LayerNorm pre-norm, dense tanh-GELU MLP of
  width 4 * d_model, MHA, fused per-head query_key_value, every bias present."""
  name, architecture, model_type = "bloom", "BloomForCausalLM", "bloom"

  def blockers(self, c):
    b = Blockers(c, self.architecture)
    b.common()
    b.require(c.norm == "layernorm", "norm", "BLOOM uses LayerNorm")
    b.require(c.norm_placement == "pre", "norm_placement", "BLOOM is pre-norm")
    b.require(not c.parallel_block, "parallel_block", "BLOOM blocks are sequential")
    b.require(c.ffn == "gelu_tanh", "ffn", "BLOOM's MLP is the dense tanh-approximate GELU")
    b.require(c.ffn_dim == 4 * c.d_model, "ffn_dim", f"BLOOM's MLP width is 4 * d_model = {4 * c.d_model}")
    b.require(c.position == "alibi", "position", "BLOOM uses ALiBi")
    b.require(c.embed_norm, "embed_norm", "BLOOM normalises the word embeddings (embed_norm=True)")
    b.require(c.num_kv_heads == c.num_heads, "num_kv_heads", "BLOOM has no grouped-query attention")
    b.require(c.d_model == c.num_heads * c.head_dim, "head_dim",
              f"BLOOM derives head_dim = d_model / num_heads = {c.d_model / c.num_heads:g}")
    return b.items

  def hf_config(self, c):
    return {
        "hidden_size": c.d_model, "n_layer": c.num_layers, "n_head": c.num_heads,
        "layer_norm_epsilon": c.norm_eps, "apply_residual_connection_post_layernorm": False,
        "pretraining_tp": 1, "slow_but_exact": False, "tie_word_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "seq_length": c.max_length}

  def tensors(self, c):
    t = Tables(c)
    D = c.d_model
    m = ("layers", "mlp")
    maps = [t.embedding("transformer.word_embeddings.weight")]
    maps += t.norm("transformer.word_embeddings_layernorm", ("embed_norm",))
    for i in range(c.num_layers):
      p = f"transformer.h.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i)
      maps += t.fused_qkv_per_head(f"{p}.self_attention.query_key_value", i, None, True)
      maps.append(t.heads_out(f"{p}.self_attention.dense.weight", ("layers", "attn", "wo"), i))
      maps.append(t.same(f"{p}.self_attention.dense.bias", ("layers", "attn", "bo"), (D,), i)
                  if c.attn_out_bias else t.zeros(f"{p}.self_attention.dense.bias", (D,), i, "attn_out_bias"))
      maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i)
      maps += t.mlp_linear(f"{p}.mlp.dense_h_to_4h", m + ("w_up",), i, True, m + ("b_up",))
      maps += t.mlp_linear(f"{p}.mlp.dense_4h_to_h", m + ("w_down",), i, True, m + ("b_down",))
    maps += t.norm("transformer.ln_f", ("final_norm",))
    return maps + t.lm_head()

  def model_config(self, hf):
    if getattr(hf, "apply_residual_connection_post_layernorm", False):
      raise ValueError("config.json apply_residual_connection_post_layernorm=True: no glmjax equivalent")
    D, H = hf.hidden_size, hf.n_head
    return ModelConfig(prompt_layout="causal",  # a HF CausalLM: plain causal prompts
        vocab_size=hf.vocab_size, d_model=D, num_layers=hf.n_layer, num_heads=H, num_kv_heads=H,
        head_dim=D // H, ffn_dim=4 * D, max_length=getattr(hf, "seq_length", None) or 2048,
        norm="layernorm", norm_eps=hf.layer_norm_epsilon, ffn="gelu_tanh", qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, position="alibi", embed_norm=True,
        tie_embeddings=hf.tie_word_embeddings)


class TorchReference(Target):
  """glmjax.export.torch_model.GLMJaxForCausalLM: every ModelConfig, glmjax names, per-layer tensors."""
  name, architecture, model_type = "torch", "GLMJaxForCausalLM", "glmjax"

  def blockers(self, c):
    return []

  def hf_config(self, c):
    return {}

  def tensors(self, c):
    from glmjax.model import is_spec, param_specs  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    maps = []
    for path, spec in jax.tree_util.tree_flatten_with_path(param_specs(c), is_leaf=is_spec)[0]:
      keys = tuple(k.key for k in path)
      if keys[0] == "layers":
        for i in range(c.num_layers):
          name = ".".join(("layers", str(i)) + keys[1:])
          maps.append(self._identity(name, keys, spec.shape[1:], i))
      else:
        maps.append(self._identity(".".join(keys), keys, spec.shape, None))
    return maps

  @staticmethod
  def _identity(name, path, shape, layer):
    return TensorMap(name, tuple(shape), (path,), layer, lambda x: x, lambda x: {path: x})


NATIVE_TARGETS = (Llama(), Glm(), Cohere(), GPTNeoX(), GPT2(), Bloom())
REFERENCE = TorchReference()
TARGETS = {t.name: t for t in NATIVE_TARGETS + (REFERENCE,)}
MODEL_TYPES = {"llama": "llama", "glm": "glm", "glm4": "glm", "cohere": "cohere",
               "gpt_neox": "gpt_neox", "gpt2": "gpt2", "bloom": "bloom", "glmjax": "torch"}


def architecture(target: Target, config: ModelConfig) -> tuple[str, str]:
  """(architectures[0], model_type) written to config.json."""
  if isinstance(target, Glm):
    return target.architecture_for(config), target.model_type_for(config)
  return target.architecture, target.model_type


def unsupported_message(config: ModelConfig, names=None) -> str:
  lines = []
  for target in NATIVE_TARGETS:
    if names and target.name not in names:
      continue
    blockers = target.blockers(config)
    if blockers:
      lines.append(f"  {target.architecture} ({target.name}): " + "; ".join(blockers))
  return "\n".join(lines)


def select(config: ModelConfig, target: str = "auto") -> Target:
  """The target named, or for "auto" the first native class that represents the config exactly
  (else the torch reference model); "native" is "auto" without the fallback."""
  if target in ("auto", "native"):
    for candidate in NATIVE_TARGETS:
      if not candidate.blockers(config):
        return candidate
    if target == "auto":
      return REFERENCE
    raise ValueError("no transformers class represents this model exactly:\n"
                     + unsupported_message(config)
                     + "\nuse target='torch' (glmjax.export.torch_model) to export it for PyTorch")
  if target not in TARGETS:
    raise ValueError(f"unknown export target {target!r}; choose one of "
                     f"{['auto', 'native'] + list(TARGETS)}")
  chosen = TARGETS[target]
  blockers = chosen.blockers(config)
  if blockers:
    raise ValueError(f"{chosen.architecture} cannot represent this model exactly:\n  "
                     + "\n  ".join(blockers)
                     + "\nuse target='auto' to pick a class that can (or 'torch' for the reference model)")
  return chosen


# `chatglm` (glmjax.export.families.ChatGlm, ChatGLM2/3 / GLM-4's own layout) registers itself in
# TARGETS when families is imported; it is exported by name only: "auto" picks classes transformers
# ships, and ChatGLM's needs the hub's remote code.
from glmjax.export import families  # noqa: E402,F401  pylint: disable=wrong-import-position,cyclic-import
