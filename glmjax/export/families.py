"""The GLM family's own checkpoint layouts, in their published tensor names and config fields.

  ChatGLM2-6B / ChatGLM3-6B(-32k) / GLM-4-9B  `ChatGlm`     model_type "chatglm" (import + export)
  ChatGLM-6B                                  `ChatGlm6B`   model_type "chatglm", position_encoding_2d
  GLM-10B / GLM-Large (HF remote code)        `GlmBlock`    model_type "glm", architectures GLMModel
  GLM-130B (SwissArmyTransformer shards)      `Glm130BSat`  model_config.json model_class "GLM130B"

Each is a `targets.Target` (tensor table + the ModelConfig of a config.json) whose
`configure(raw, reader)` reads the config.json fields the published modeling code reads, so
no remote code is run. References (the HF-hub files of THUDM's repositories):

  chatglm2/3, glm-4: THUDM/chatglm2-6b modeling_chatglm.py (mirrored in
    bq-xiao/chatglm2-6b-model modeling_chatglm.py at 3fcffc41): RotaryEmbedding l.121-157
    (dim = kv_channels // 2, theta = base^(-2i/dim); ChatGLM3-6B-32k's and GLM-4-9B's
    forward_impl set `base = base * self.rope_ratio`, rope_ratio=config.rope_ratio, e.g. as
    adapted from THUDM/glm-4v-9b in optimum-habana), apply_rotary_pos_emb l.161-178 (interleaved pairs (2i, 2i+1) of the first
    rot_dim dims), SelfAttention l.313-457 (query_key_value = [q heads; k groups; v groups]
    under multi_query_attention, else [head, (q, k, v), hn]; kv group g serves query heads
    g*H/K .. (g+1)*H/K - 1), MLP l.459-503 (dense_h_to_4h = [gate; up], swiglu = silu(x[0]) *
    x[1]), GLMBlock l.505-577 (pre-RMSNorm), ChatGLMModel l.733-760 (output_layer untied).
  chatglm-6b: THUDM/chatglm-6b modeling_chatglm.py SelfAttention (query_key_value viewed as
    [np, 3 * hn]; 2D rotary: q.chunk(2) halves rotated by position_ids / block_position_ids,
    rotate_half, dim = hidden // (heads * 2)), GLMBlock (alpha = (2 * num_layers)^0.5:
    h = ln(x); x = h * alpha + attn(h); h = ln(x); out = h * alpha + mlp(h)), GELU =
    gelu_impl (tanh), untied lm_head. Not modelled by glmjax: its RotaryEmbedding rounds
    inv_freq to float16 (`inv_freq.half()`), so long positions rotate slightly differently.
  glm-10b / glm-large: THUDM's HF modeling_glm.py (THUDM/glm-large-chinese's, as forked in
    sunzeyeah/RLHF src/resources/models/glm-350M-chinese/modeling_glm.py): `from
    transformers.activations import gelu` (l.25, the exact erf GELU) in MLP (4h), SelfAttention
    (query_key_value split in three along the features: [q; k; v]), GLMBlock (pre-LayerNorm),
    GLMStack (position and block-position tables of max_sequence_length + 1 rows when
    block_position_encoding), GLMModel (logits = F.linear(output, word_embeddings.weight));
    config.json fields as that folder's config.json (architectures GLMModel, model_type glm).
    The original GLM repo's mpu uses the tanh GELU; the HF port, which these checkpoints are
    loaded with, the erf one.
  glm-130b: SwissArmyTransformer sat/model/official/glm130B_model.py RotaryEmbeddingMixin
    (query_key_value viewed as [np, 3 * hn], 1D rotary over the whole head, rotate_half),
    GEGLU (x1 * gelu(x2): the first half is the linear branch), DeepNormWithGLUMixin,
    FinalForwardMixin (tied); shards merged as GLM-130B tools/convert_tp.py.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from glmjax.export import targets
from glmjax.export.targets import Tables, TensorMap, layout_permutation
from glmjax.model.config import ModelConfig

ROPE_BASE = 10000.0


class Fields:
  """Reads config.json fields; a missing or mistyped one is a one-line ValueError naming it."""

  def __init__(self, raw: dict, source: str, family: str):
    self.raw, self.source, self.family = raw, source, family

  def need(self, name: str, kind=int):
    if self.raw.get(name) is None:
      raise ValueError(f"{self.source}: field {name!r} is missing; the {self.family} layout needs it "
                       "(restore the checkpoint's original config.json)")
    return self.check(name, self.raw[name], kind)

  def get(self, name: str, default, kind=None):
    value = self.raw.get(name)
    if value is None:
      return default
    return self.check(name, value, kind or type(default))

  def check(self, name, value, kind):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if not ok or (kind is int and value <= 0):
      raise ValueError(f"{self.source}: field {name!r}={value!r} is not a positive "
                       f"{kind.__name__}; restore the checkpoint's original config.json")
    return float(value) if kind is float else value

  def refuse(self, name: str, bad, why: str):
    """A field whose value (other than the code default) glmjax cannot represent."""
    if name in self.raw and self.raw[name] not in (None,) and bad(self.raw[name]):
      raise ValueError(f"{self.source}: field {name}={self.raw[name]!r}: {why}")


def layout_fields(layout: str) -> dict:
  """ModelConfig.prompt_layout for the family (glmjax.model.config; absent in older trees)."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  return {"prompt_layout": layout} if "prompt_layout" in names else {}


def table_rows(config: ModelConfig) -> int:
  """Rows of the learned position tables glmjax allocates for `config` (param_specs)."""
  from glmjax.model import param_specs  # pylint: disable=import-outside-toplevel
  return param_specs(config)["embed"]["position"].shape[0]


def _mismatch(name, shape, expected):
  raise targets.WeightMismatch(f"{name} has shape {tuple(shape)}, the config implies {tuple(expected)}")


class Family(targets.Target):
  """A GLM-family layout: config from the raw config.json (no transformers class exists)."""
  exportable = False
  family = ""

  def detect(self, raw: dict) -> bool:
    raise NotImplementedError

  def configure(self, raw: dict, reader, source: str) -> tuple[targets.Target, ModelConfig]:
    """(the target for this checkpoint's tensor names, its ModelConfig)."""
    raise NotImplementedError

  def hf_config(self, c):
    return {}


# --- ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B ------------------------------------------------------

class ChatGlm(Family):
  """ChatGLM2/3 and GLM-4 (`ChatGLMModel`, model_type "chatglm"): RMSNorm pre-norm, fused
  query_key_value with bias, interleaved RoPE over half of each head, fused [gate; up] SwiGLU,
  no other biases, untied `transformer.output_layer`."""
  name, architecture, model_type = "chatglm", "ChatGLMModel", "chatglm"
  family = "ChatGLM2/3 / GLM-4"
  exportable = True
  layout = "interleaved"
  # The modeling code from the hub for AutoModelForCausalLM.from_pretrained(out,
  # trust_remote_code=True): ChatGLM3's handles multi-query groups and rope_ratio.
  remote_code = "THUDM/chatglm3-6b"

  def detect(self, raw):
    return raw.get("model_type") == "chatglm" and "padded_vocab_size" in raw

  def blockers(self, c):
    b = targets.Blockers(c, self.architecture)
    b.common()
    b.require(c.norm == "rmsnorm", "norm", "ChatGLM2/3 / GLM-4 use RMSNorm")
    b.require(c.norm_placement == "pre", "norm_placement", "ChatGLM2/3 / GLM-4 are pre-norm")
    b.require(not c.parallel_block, "parallel_block", "ChatGLM blocks are sequential")
    b.require(c.ffn == "swiglu", "ffn", "ChatGLM's MLP is swiglu (silu(x[0]) * x[1])")
    b.require(c.mlp_bias == c.attn_out_bias, "mlp_bias",
              "one switch (add_bias_linear) gives the dense and MLP layers their biases")
    b.require(c.qkv_bias or not c.attn_out_bias, "qkv_bias",
              "add_bias_linear also gives query_key_value its bias")
    b.require(c.position == "rope", "position", "ChatGLM uses RoPE")
    b.require(c.rotary_fraction == 0.5, "rotary_fraction",
              "ChatGLM rotates the first half of each head (RotaryEmbedding(kv_channels // 2))")
    b.require(not c.embed_norm, "embed_norm", "ChatGLM has no embedding norm")
    return b.items

  def hf_config(self, c):
    """configuration_chatglm.py ChatGLMConfig fields (values of chatglm3-6b for the switches)."""
    return {
        "num_layers": c.num_layers, "padded_vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "ffn_hidden_size": c.ffn_dim, "kv_channels": c.head_dim,
        "num_attention_heads": c.num_heads, "seq_length": c.max_length,
        "multi_query_attention": True, "multi_query_group_num": c.num_kv_heads,
        "layernorm_epsilon": c.norm_eps, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
        "add_bias_linear": c.attn_out_bias, "add_qkv_bias": c.qkv_bias,
        "bias_dropout_fusion": True, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "original_rope": True,
        "rope_ratio": c.rope_theta / ROPE_BASE, "tie_word_embeddings": False,
        "auto_map": {k: f"{self.remote_code}--{v}" for k, v in (
            ("AutoConfig", "configuration_chatglm.ChatGLMConfig"),
            ("AutoModel", "modeling_chatglm.ChatGLMForConditionalGeneration"),
            ("AutoModelForCausalLM", "modeling_chatglm.ChatGLMForConditionalGeneration"))}}

  def tensors(self, c, mqa: bool = True):
    t = Tables(c)
    perm = layout_permutation(c.head_dim, c.rotary_dim, c.rope_layout, self.layout)
    D, Fd = c.d_model, c.ffn_dim
    a, m = ("layers", "attn"), ("layers", "mlp")
    maps = [t.embedding("transformer.embedding.word_embeddings.weight")]
    for i in range(c.num_layers):
      p = f"transformer.encoder.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i, bias_name=None)
      qkv = f"{p}.self_attention.query_key_value"
      maps += (_grouped_qkv(t, qkv, i, perm) if mqa
               else t.fused_qkv_per_head(qkv, i, perm, c.qkv_bias))
      maps.append(t.heads_out(f"{p}.self_attention.dense.weight", a + ("wo",), i))
      if c.attn_out_bias:
        maps.append(t.same(f"{p}.self_attention.dense.bias", a + ("bo",), (D,), i))
      maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i, bias_name=None)
      maps.append(_fused_pair(f"{p}.mlp.dense_h_to_4h.weight", (m + ("w_gate",), m + ("w_up",)),
                              i, Fd, D, transpose=True))
      if c.mlp_bias:
        maps.append(_fused_pair(f"{p}.mlp.dense_h_to_4h.bias", (m + ("b_gate",), m + ("b_up",)),
                                i, Fd, None, transpose=False))
      maps += t.mlp_linear(f"{p}.mlp.dense_4h_to_h", m + ("w_down",), i, c.mlp_bias, m + ("b_down",))
    maps += t.norm("transformer.encoder.final_layernorm", ("final_norm",), bias_name=None)
    head = ("embed", "embedding") if c.tie_embeddings else ("lm_head", "kernel")
    maps.append(t.same("transformer.output_layer.weight", head, (c.vocab_size, D)) if c.tie_embeddings
                else t.transposed("transformer.output_layer.weight", head, (c.vocab_size, D)))
    return maps

  def configure(self, raw, reader, source):
    f = Fields(raw, source, self.family)
    f.refuse("rmsnorm", lambda v: v is not True, "LayerNorm ChatGLM variants are not supported")
    f.refuse("post_layer_norm", lambda v: v is not True, "glmjax always has the final norm")
    f.refuse("apply_residual_connection_post_layernorm", lambda v: v is not False,
             "glmjax's residual is the block input")
    f.refuse("original_rope", lambda v: v is not True, "only the original RoPE is implemented")
    f.refuse("quantization_bit", lambda v: v not in (0,), "quantized weights are not importable; "
             "import the unquantized checkpoint")
    f.refuse("pre_seq_len", lambda v: True, "P-tuning v2 prefix encoders are not importable")
    f.refuse("rope_scaling", lambda v: True, "RoPE scaling is not implemented")
    heads = f.need("num_attention_heads")
    mqa = f.get("multi_query_attention", False, bool)
    kv_heads = f.need("multi_query_group_num") if mqa else heads
    bias_linear = f.get("add_bias_linear", False, bool)
    config = ModelConfig(
        vocab_size=f.need("padded_vocab_size"), d_model=f.need("hidden_size"),
        num_layers=f.need("num_layers"), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=f.need("kv_channels"), ffn_dim=f.need("ffn_hidden_size"),
        max_length=f.need("seq_length"), norm="rmsnorm", norm_placement="pre",
        norm_eps=f.get("layernorm_epsilon", 1e-5, float), ffn="swiglu",
        qkv_bias=f.get("add_qkv_bias", False, bool) or bias_linear,
        attn_out_bias=bias_linear, mlp_bias=bias_linear, position="rope",
        rope_theta=ROPE_BASE * f.get("rope_ratio", 1.0, float), rotary_fraction=0.5,
        rope_layout=self.layout, tie_embeddings=False, **layout_fields("causal"))
    return (self if mqa else _PerHeadChatGlm()), config


class _PerHeadChatGlm(ChatGlm):
  """ChatGLM2 code with multi_query_attention false: query_key_value is [head, (q, k, v), hn]."""

  def tensors(self, c, mqa: bool = False):
    return super().tensors(c, mqa=False)


def _grouped_qkv(t: Tables, name: str, layer: int, perm) -> list:
  """query_key_value [(H + 2K) * Dh, D] = [q heads; k groups; v groups] (and its bias)."""
  c = t.c
  H, K, Dh, D = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
  a = ("layers", "attn")
  paths, sizes = (a + ("wq",), a + ("wk",), a + ("wv",)), (H * Dh, K * Dh, K * Dh)
  splits = np.cumsum(sizes)[:-1]

  def to_hf(wq, wk, wv):
    parts = [targets._permute(wq, perm), targets._permute(wk, perm), wv]  # pylint: disable=protected-access
    return np.concatenate([w.reshape(D, -1) for w in parts], axis=1).T

  def from_hf(w):
    wq, wk, wv = np.split(w.T, splits, axis=1)
    return {paths[0]: targets._unpermute(wq.reshape(D, H, Dh), perm),  # pylint: disable=protected-access
            paths[1]: targets._unpermute(wk.reshape(D, K, Dh), perm),  # pylint: disable=protected-access
            paths[2]: np.ascontiguousarray(wv.reshape(D, K, Dh))}

  maps = [TensorMap(f"{name}.weight", (sum(sizes), D), paths, layer, to_hf, from_hf)]
  if c.qkv_bias:
    bpaths = (a + ("bq",), a + ("bk",), a + ("bv",))

    def bias_to_hf(bq, bk, bv):
      return np.concatenate([targets._permute(bq, perm).reshape(-1),  # pylint: disable=protected-access
                             targets._permute(bk, perm).reshape(-1), bv.reshape(-1)])  # pylint: disable=protected-access

    def bias_from_hf(b):
      bq, bk, bv = np.split(b, splits)
      return {bpaths[0]: targets._unpermute(bq.reshape(H, Dh), perm),  # pylint: disable=protected-access
              bpaths[1]: targets._unpermute(bk.reshape(K, Dh), perm),  # pylint: disable=protected-access
              bpaths[2]: bv.reshape(K, Dh).copy()}
    maps.append(TensorMap(f"{name}.bias", (sum(sizes),), bpaths, layer, bias_to_hf, bias_from_hf))
  return maps


def _fused_pair(name: str, paths: tuple, layer: int, rows: int, cols: Optional[int], transpose: bool):
  """Two glmjax leaves stacked as [first; second] on the output features (dense_h_to_4h)."""
  shape = (2 * rows, cols) if cols is not None else (2 * rows,)

  def to_hf(first, second):
    if transpose:
      return np.concatenate([first.T, second.T], axis=0)
    return np.concatenate([first, second], axis=0)

  def from_hf(w):
    one, two = w[:rows], w[rows:]
    if transpose:
      return {paths[0]: np.ascontiguousarray(one.T), paths[1]: np.ascontiguousarray(two.T)}
    return {paths[0]: one.copy(), paths[1]: two.copy()}

  return TensorMap(name, shape, paths, layer, to_hf, from_hf)


# --- ChatGLM-6B ---------------------------------------------------------------------------------

def _per_head_qkv(t: Tables, name: str, layer: int) -> list:
  """query_key_value [H * 3 * Dh, D] viewed as [head, (q, k, v), hn] (with its bias)."""
  return t.fused_qkv_per_head(name, layer, None, True)


def _deepnorm_block_tables(t: Tables, p: str, i: int, gated_first_is_up: bool) -> list:
  """LayerNorms, per-head fused attention and the MLP of a SAT-style block (ChatGLM-6B, GLM-130B)."""
  c = t.c
  D, Fd = c.d_model, c.ffn_dim
  a, m = ("layers", "attn"), ("layers", "mlp")
  maps = t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i)
  maps += _per_head_qkv(t, f"{p}.attention.query_key_value", i)
  maps.append(t.heads_out(f"{p}.attention.dense.weight", a + ("wo",), i))
  maps.append(t.same(f"{p}.attention.dense.bias", a + ("bo",), (D,), i))
  maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i)
  if c.ffn_gated:
    order = ("up", "gate") if gated_first_is_up else ("gate", "up")
    maps.append(_fused_pair(f"{p}.mlp.dense_h_to_4h.weight", tuple(m + (f"w_{k}",) for k in order),
                            i, Fd, D, transpose=True))
    maps.append(_fused_pair(f"{p}.mlp.dense_h_to_4h.bias", tuple(m + (f"b_{k}",) for k in order),
                            i, Fd, None, transpose=False))
  else:
    maps += t.mlp_linear(f"{p}.mlp.dense_h_to_4h", m + ("w_up",), i, True, m + ("b_up",))
  maps += t.mlp_linear(f"{p}.mlp.dense_4h_to_h", m + ("w_down",), i, True, m + ("b_down",))
  return maps


class ChatGlm6B(Family):
  """ChatGLM-6B (`ChatGLMModel`, model_type "chatglm", position_encoding_2d): DeepNorm LayerNorm
  blocks, per-head fused qkv, 2D RoPE, tanh-GELU MLP, every bias, untied lm_head."""
  name, architecture, model_type = "chatglm6b", "ChatGLMModel", "chatglm"
  family = "ChatGLM-6B"

  def detect(self, raw):
    return raw.get("model_type") == "chatglm" and "padded_vocab_size" not in raw

  def blockers(self, c):
    return ["ChatGLM-6B checkpoints are imported only; export with --target chatglm (ChatGLM2/3 "
            "layout) or torch"]

  def tensors(self, c):
    t = Tables(c)
    maps = [t.embedding("transformer.word_embeddings.weight")]
    for i in range(c.num_layers):
      maps += _deepnorm_block_tables(t, f"transformer.layers.{i}", i, gated_first_is_up=False)
    maps += t.norm("transformer.final_layernorm", ("final_norm",))
    return maps + t.lm_head("lm_head.weight")

  def configure(self, raw, reader, source):
    f = Fields(raw, source, self.family)
    f.refuse("quantization_bit", lambda v: v not in (0,), "quantized weights are not importable; "
             "import the unquantized checkpoint")
    f.refuse("pre_seq_len", lambda v: True, "P-tuning v2 prefix encoders are not importable")
    d_model, heads = f.need("hidden_size"), f.need("num_attention_heads")
    if d_model % heads:
      raise ValueError(f"{source}: hidden_size={d_model} is not divisible by num_attention_heads="
                       f"{heads} (ChatGLM-6B's head size is their quotient)")
    two_d = f.get("position_encoding_2d", True, bool)
    position = dict(position="rope_2d") if two_d else dict(position="rope", rope_layout="rotate_half")
    config = ModelConfig(
        vocab_size=f.need("vocab_size"), d_model=d_model, num_layers=f.need("num_layers"),
        num_heads=heads, num_kv_heads=heads, head_dim=d_model // heads,
        ffn_dim=f.need("inner_hidden_size"), max_length=f.need("max_sequence_length"),
        norm="layernorm", norm_placement="deepnorm", norm_eps=f.get("layernorm_epsilon", 1e-5, float),
        ffn="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True, rope_theta=ROPE_BASE,
        tie_embeddings=False, **position, **layout_fields("glm"))
    return self, config


# --- GLM-10B / GLM-Large (HF remote code GLMModel) ----------------------------------------------

GLM_ARCHITECTURES = ("GLMModel", "GLMForConditionalGeneration", "GLMForMultipleChoice",
                     "GLMForSequenceClassification")


class GlmBlock(Family):
  """GLM-10B / GLM-Large as on the HF hub (`GLMModel`): pre-LayerNorm, [q; k; v] fused attention,
  learned position + block-position tables, 4h GELU MLP, every bias, logits on the embedding."""
  name, architecture, model_type = "glm_block", "GLMModel", "glm"
  family = "GLM-10B / GLM-Large"

  def __init__(self, prefix: str = "glm."):
    self.prefix = prefix

  def detect(self, raw):
    archs = raw.get("architectures") or []
    return raw.get("model_type") == "glm" and (
        any(a in GLM_ARCHITECTURES for a in archs) or "block_position_encoding" in raw
        or ("num_layers" in raw and "num_hidden_layers" not in raw))

  def blockers(self, c):
    return ["GLM-10B / GLM-Large checkpoints are imported only; export with --target torch"]

  def tensors(self, c):
    t = Tables(c)
    D = c.d_model
    a, m = ("layers", "attn"), ("layers", "mlp")
    g = self.prefix
    rows = table_rows(c)
    maps = [t.embedding(f"{g}word_embeddings.weight"),
            t.same(f"{g}transformer.position_embeddings.weight", ("embed", "position"), (rows, D))]
    if c.position == "learned_2d":
      maps.append(t.same(f"{g}transformer.block_position_embeddings.weight",
                         ("embed", "block_position"), (rows, D)))
    qkv = (a + ("wq",), a + ("wk",), a + ("wv",))
    bqkv = (a + ("bq",), a + ("bk",), a + ("bv",))
    H, Dh = c.num_heads, c.head_dim
    for i in range(c.num_layers):
      p = f"{g}transformer.layers.{i}"
      maps += t.norm(f"{p}.input_layernorm", ("layers", "attn_norm"), i)
      maps.append(TensorMap(
          f"{p}.attention.query_key_value.weight", (3 * H * Dh, D), qkv, i,
          lambda wq, wk, wv: np.concatenate([w.reshape(D, -1) for w in (wq, wk, wv)], axis=1).T,
          lambda w: {path: np.ascontiguousarray(part.T.reshape(D, H, Dh))
                     for path, part in zip(qkv, np.split(w, 3, axis=0))}))
      maps.append(TensorMap(
          f"{p}.attention.query_key_value.bias", (3 * H * Dh,), bqkv, i,
          lambda bq, bk, bv: np.concatenate([b.reshape(-1) for b in (bq, bk, bv)]),
          lambda b: {path: part.reshape(H, Dh).copy() for path, part in zip(bqkv, np.split(b, 3))}))
      maps.append(t.heads_out(f"{p}.attention.dense.weight", a + ("wo",), i))
      maps.append(t.same(f"{p}.attention.dense.bias", a + ("bo",), (D,), i))
      maps += t.norm(f"{p}.post_attention_layernorm", ("layers", "mlp_norm"), i)
      maps += t.mlp_linear(f"{p}.mlp.dense_h_to_4h", m + ("w_up",), i, True, m + ("b_up",))
      maps += t.mlp_linear(f"{p}.mlp.dense_4h_to_h", m + ("w_down",), i, True, m + ("b_down",))
    maps += t.norm(f"{g}transformer.final_layernorm", ("final_norm",))
    return maps

  def configure(self, raw, reader, source):
    f = Fields(raw, source, self.family)
    f.refuse("relative_encoding", lambda v: v is not False, "Transformer-XL relative positions are "
             "not implemented")
    f.refuse("spell_length", lambda v: True, "P-tuning prompt-spell tensors are not importable")
    f.refuse("max_memory_length", lambda v: v != 0, "Transformer-XL memory is not implemented")
    d_model, heads = f.need("hidden_size"), f.need("num_attention_heads")
    if d_model % heads:
      raise ValueError(f"{source}: hidden_size={d_model} is not divisible by num_attention_heads="
                       f"{heads} (GLM's head size is their quotient)")
    block = f.get("block_position_encoding", True, bool)
    prefix = "glm." if "glm.word_embeddings.weight" in reader else ""
    table = f"{prefix}transformer.position_embeddings.weight"
    if table not in reader:
      raise targets.WeightMismatch(f"{reader.directory} has no tensor {table!r}, which GLMModel needs")
    max_seq = f.need("max_sequence_length")
    base = ModelConfig(
        vocab_size=f.need("vocab_size"), d_model=d_model, num_layers=f.need("num_layers"),
        num_heads=heads, num_kv_heads=heads, head_dim=d_model // heads, ffn_dim=4 * d_model,
        max_length=max_seq, norm="layernorm", norm_placement="pre", norm_eps=1e-5, ffn="gelu",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        position="learned_2d" if block else "learned", tie_embeddings=True,
        **layout_fields("glm" if block else "causal"))
    # GLMStack: tables of max_sequence_length + 1 rows with block positions, else max_sequence_length.
    rows = max_seq + 1 if block else max_seq
    if tuple(reader.shape(table)) != (rows, d_model):
      _mismatch(table, reader.shape(table), (rows, d_model))
    config = base if table_rows(base) == rows else dataclasses.replace(
        base, max_length=base.max_length + rows - table_rows(base))
    return GlmBlock(prefix), config


# --- GLM-130B (SwissArmyTransformer) ------------------------------------------------------------

SAT_CONFIG = "model_config.json"
GLM130B_CONFIG = {  # GLM-130B configs/model_glm_130b.sh MODEL_ARGS
    "model_class": "GLM130B", "num_layers": 70, "hidden_size": 12288, "inner_hidden_size": 32768,
    "vocab_size": 150528, "num_attention_heads": 96, "max_sequence_length": 2048,
    "layernorm_order": "post", "model_parallel_size": 8}


class Glm130BSat(Family):
  """GLM-130B as SwissArmyTransformer saves it: DeepNorm LayerNorm blocks, per-head fused qkv,
  1D rotate_half RoPE over the whole head, GEGLU [linear; gate], every bias, tied logits."""
  name, architecture, model_type = "glm130b_sat", "GLM130B", "glm130b"
  family = "GLM-130B (SAT)"

  def detect(self, raw):
    return raw.get("model_class") == "GLM130B"

  def blockers(self, c):
    return ["GLM-130B SAT checkpoints are imported only; export with --target torch"]

  def tensors(self, c):
    t = Tables(c)
    maps = [t.embedding("transformer.word_embeddings.weight")]
    for i in range(c.num_layers):
      maps += _deepnorm_block_tables(t, f"transformer.layers.{i}", i, gated_first_is_up=True)
    return maps + t.norm("transformer.final_layernorm", ("final_norm",))

  def configure(self, raw, reader, source):
    f = Fields(raw, source, self.family)
    f.refuse("position_encoding_2d", lambda v: v is not False, "GLM-130B's rotary is 1D")
    f.refuse("no_glu", lambda v: v is not False, "GLM-130B's MLP is GEGLU")
    f.refuse("use_final_layernorm", lambda v: v is not True, "glmjax always has the final norm")
    heads, hidden = f.need("num_attention_heads"), f.need("hidden_size")
    vocab, inner = f.need("vocab_size"), f.get("inner_hidden_size", 4 * hidden * 2 // 3, int)
    quantized = [n for n in reader.names() if n.endswith("_scale")]
    if quantized:
      raise ValueError(f"{reader.directory} holds quantized weights ({quantized[0]}: GLM-130B "
                       "tools/convert_tp.py --quantization-bit-width); import the float16 checkpoint")
    tp = getattr(reader, "tensor_parallel", 1)
    declared = f.get("model_parallel_size", tp, int)
    if declared != tp:
      raise ValueError(f"{source}: model_parallel_size={declared} but {reader.directory} holds {tp} "
                       "mp_rank_XX_model_states.pt shards; a shard is missing or the folder mixes "
                       "checkpoints")
    for field, value in (("num_attention_heads", heads), ("vocab_size", vocab),
                         ("inner_hidden_size", inner)):
      if value % tp:
        raise ValueError(f"{source}: {field}={value} does not divide into the {tp} tensor-parallel "
                         f"shards of {reader.directory}; the shards and {SAT_CONFIG} are of "
                         "different checkpoints")
    if hidden % heads:
      raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads="
                       f"{heads}")
    config = ModelConfig(
        vocab_size=vocab, d_model=hidden, num_layers=f.need("num_layers"), num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, ffn_dim=inner,
        max_length=f.need("max_sequence_length"), norm="layernorm", norm_placement="deepnorm",
        norm_eps=f.get("layernorm_epsilon", 1e-5, float), ffn="geglu", qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, position="rope", rope_theta=ROPE_BASE,
        rope_layout="rotate_half", tie_embeddings=True, embed_grad_scale=0.1,
        **layout_fields("glm130b"))
    return self, config


CHATGLM = ChatGlm()
targets.TARGETS[CHATGLM.name] = CHATGLM
FAMILIES = (CHATGLM, ChatGlm6B(), GlmBlock(), Glm130BSat())


def detect(raw: dict) -> Optional[Family]:
  """The family layout a config.json (or SAT model_config.json) describes, if any."""
  for family in FAMILIES:
    if family.detect(raw):
      return family
  return None
