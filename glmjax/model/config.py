"""`ModelConfig`: every architecture of the seed papers as a combination of fields.

The size fields (`vocab_size`, `d_model`, `num_layers`, `num_heads`,
`num_kv_heads`, `head_dim`, `ffn_dim`, `max_length`) are a contract
(DESIGN.md section 2). Everything else names one architectural choice:

| model         | norm / placement        | ffn     | positions            | other                          |
|---------------|-------------------------|---------|----------------------|--------------------------------|
| GLM (10B)     | layernorm / pre         | gelu_tanh | learned_2d         | tied embeddings, biases        |
| GLM-130B      | layernorm / deepnorm    | geglu   | rope (1D)            | embedding grad shrink 0.1      |
| ChatGLM-6B    | layernorm / deepnorm    | gelu_tanh | rope_2d            | untied head                    |
| ChatGLM2-6B   | rmsnorm / pre           | swiglu  | rope, half, interleaved | GQA (2 groups), qkv bias only |
| LLaMA 1/2     | rmsnorm / pre           | swiglu  | rope, rotate_half    | GQA for 70B                    |
| PaLM          | layernorm (no bias)     | swiglu  | rope                 | parallel block, MQA, tied      |
| BLOOM         | layernorm / pre         | gelu_tanh | alibi              | embedding layernorm, tied      |
| GPT-2         | layernorm / pre         | gelu_tanh | learned            | tied, biases                   |

`prompt_layout` is how the family lays out a prompt / training example (identity, not runtime:
the same weights prompted another way are another function):

* "glm": Part A bidirectional, 2D positions (Part B tokens at their mask's index, block
  positions 1, 2, ...): GLM-10B / GLM-Large (GLM `blocklm_utils.py`), ChatGLM-6B (HF
  `modeling_chatglm.py` `get_position_ids`, position_encoding_2d).
* "glm130b": Part A bidirectional, one position stream: every token of a [MASK] / [sMASK] span
  at the mask's index, a [gMASK] continuation at consecutive positions (GLM-130B `generate.py`
  `get_masks_and_position_ids`: `position_ids = arange(...)`, `if not gmask:
  position_ids[context_length - 1:] = mask_position`).
* "causal": every token causal at 0, 1, 2, ...: ChatGLM2/3 and GLM-4 (HF `modeling_chatglm.py`
  of chatglm2-6b: `get_position_ids` is `arange(seq_length)`, `get_masks` is tril), LLaMA,
  PaLM, BLOOM, GPT.

The ModelConfig default is "glm": the defaults are a small GLM-style model trained on blank
infilling, and it is the layout every run used before the field existed (DataConfig's old
defaults), so a checkpoint saved without it is prompted as it was trained.
"""

from __future__ import annotations

import dataclasses
import math

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "deepnorm")
# name -> (activation, gated). Gated FFNs (Shazeer 2020, "GLU Variants"):
# act(x W_gate) * (x W_up), then W_down.
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
POSITION_KINDS = ("none", "learned", "learned_2d", "sinusoidal", "rope", "rope_2d", "alibi")
ROPE_LAYOUTS = ("rotate_half", "interleaved")
DTYPES = ("float32", "bfloat16", "float16")
# glmjax.pallas.attention implementations: "xla" the plain reference, "dense" the same math
# with a recomputing custom VJP (fastest on CPU), "pallas" the tiled flash kernels,
# "auto" dense on CPU and pallas on TPU / GPU.
ATTENTION_IMPLS = ("auto", "xla", "dense", "pallas")
PROMPT_LAYOUTS = ("glm", "glm130b", "causal")  # see the module docstring
# prompt_layout -> (Part A bidirectional, one position stream (block positions 0)): the
# GLMFeatureConverter / DataConfig flags each layout implies.
LAYOUT_FLAGS = {"glm": (True, False), "glm130b": (True, True), "causal": (False, True)}


def layout_from_flags(bidirectional_inputs: bool, positions_1d: bool) -> str:
  """The prompt_layout of a (bidirectional_inputs, positions_1d) pair (inverse of LAYOUT_FLAGS)."""
  for layout, flags in LAYOUT_FLAGS.items():
    if flags == (bool(bidirectional_inputs), bool(positions_1d)):
      return layout
  raise ValueError(f"bidirectional_inputs={bidirectional_inputs} with positions_1d={positions_1d} is no "
                   f"prompt layout; use one of {LAYOUT_FLAGS} (ModelConfig.prompt_layout)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer. See the module docstring for the presets' choices."""

  # Sizes (contract).
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  ffn_dim: int = 256
  max_length: int = 128

  # Normalisation.
  norm: str = "layernorm"
  norm_placement: str = "pre"
  norm_eps: float = 1e-5
  norm_bias: bool = True  # LayerNorm shift; RMSNorm never has one.

  # Feed-forward.
  ffn: str = "gelu"
  num_experts: int = 0  # 0: dense FFN. >0: mixture of experts in every layer.
  experts_top_k: int = 2
  expert_capacity_factor: float = 1.25
  router_aux_loss_weight: float = 0.01

  # Attention.
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  attention_impl: str = "auto"

  # Positions.
  position: str = "rope"
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0  # ChatGLM2 rotates the first half of each head.
  rope_layout: str = "rotate_half"  # LLaMA; ChatGLM2/GLM-4 use "interleaved".
  # Long-context RoPE scaling (glmjax.model.rope_scaling): "none" | "linear" | "ntk" | "yarn" |
  # "llama3", its factor s, the pretraining length (yarn, llama3) and each method's knobs.
  # ChatGLM's rope_ratio is rope_theta = 10000 x ratio.
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_original_length: int = 0
  rope_beta_fast: float = 32.0  # YaRN
  rope_beta_slow: float = 1.0  # YaRN
  rope_attention_factor: float = 0.0  # YaRN cos/sin factor; 0: 0.1 ln s + 1
  rope_low_freq_factor: float = 1.0  # Llama 3
  rope_high_freq_factor: float = 4.0  # Llama 3

  # Block structure.
  parallel_block: bool = False  # PaLM / GPT-J: attention and MLP on the same normed input.
  parallel_shared_norm: bool = True  # PaLM: one norm; GPT-NeoX: two norms of the same input.
  tie_embeddings: bool = False
  embed_norm: bool = False  # BLOOM: LayerNorm right after the word embedding.
  embed_grad_scale: float = 1.0  # GLM-130B: 0.1 shrinks the embedding gradient only.
  lm_head_bias: bool = False

  # Prompt / example layout of the family (module docstring): "glm" | "glm130b" | "causal".
  prompt_layout: str = "glm"

  # Numerics and compilation.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  init_std: float = 0.02
  # "auto" (REMAT_AUTO: per platform), a jax.checkpoint_policies name, REMAT_POLICIES, or "none"
  remat_policy: str = "auto"
  # The training / eval loss (LOSS_FIELDS): "dense" computes [B, L, V] float32 logits, "chunked"
  # computes them `loss_chunk_size` positions at a time, forward and backward
  # (glmjax.trainer.loss.chunked_token_loss_sums). The model's function is the same.
  loss_impl: str = "dense"
  loss_chunk_size: int = 2048

  def __post_init__(self):
    validate(self)

  @property
  def rotary_dim(self) -> int:
    """Number of head dims rotated by RoPE (per position stream for rope_2d)."""
    if self.position == "rope_2d":
      return self.head_dim // 2
    return int(self.head_dim * self.rotary_fraction)

  @property
  def deepnorm_alpha(self) -> float:
    """GLM-130B DeepNorm residual scale (2N)^0.5, N = number of layers."""
    return (2.0 * self.num_layers) ** 0.5

  @property
  def deepnorm_beta(self) -> float:
    """GLM-130B DeepNorm init gain (2N)^-0.5 for ffn, value and output projections."""
    return (2.0 * self.num_layers) ** -0.5

  @property
  def ffn_activation(self) -> str:
    return FFN_KINDS[self.ffn][0]

  @property
  def ffn_gated(self) -> bool:
    return FFN_KINDS[self.ffn][1]

  @property
  def uses_learned_positions(self) -> bool:
    return self.position in ("learned", "learned_2d")

  @property
  def position_table_rows(self) -> int:
    """Rows of the learned position tables: GLM's 2D tables (position and block position) have
    max_length + 1 rows (THUDM/GLM mpu/transformer.py, GPT2ParallelTransformer.__init__, lines
    697-699: `torch.nn.Embedding(max_sequence_length + 1, hidden_size)` for both when
    block_position_encoding, with max_sequence_length = --max-position-embeddings, train_utils.py
    line 96); a 1D learned table (GPT-2 `wpe`, GLM without block positions, line 702) has
    max_length."""
    return self.max_length + 1 if self.position == "learned_2d" else self.max_length

  @property
  def has_final_norm(self) -> bool:
    """Post-LN normalises after every sublayer already (original Transformer)."""
    return self.norm_placement != "post"


# How a model runs, not what it is: the same weights give the same function under any value of
# these (up to float rounding), so they are chosen by whoever runs the model (an experiment's gin
# files, `glmjax generate` flags) and are not part of a model's identity. Exported config.json and
# the model.gin of `glmjax import` store `architecture_fields` only. `param_dtype` is identity: it
# is the dtype the weights are stored in.
RUNTIME_FIELDS = frozenset({"attention_impl", "dtype", "remat_policy"})
# How the trainer computes the loss from the model's hidden states: not the model's identity
# either (not exported, not in an imported model.gin), and the model's forward ignores them.
LOSS_FIELDS = frozenset({"loss_impl", "loss_chunk_size"})
LOSS_IMPLS = ("dense", "chunked")

# Activations the layer tags with `jax.ad_checkpoint.checkpoint_name` (glmjax.model.transformer):
# the block's input, q / k / v after their projections, the attention output before its
# projection, and the two sublayers' outputs.
CHECKPOINT_NAMES = ("layer_input", "query_proj", "key_proj", "value_proj", "attention_out",
                    "attn_out_proj", "mlp_out")
# The dense attention's own residuals (glmjax.pallas.dense, CPU): its output in the heads-major
# layout and the rows' log-sum-exp; saved by "dots_and_attention_saveable" (REMAT_WITH_DOTS).
DENSE_ATTENTION_NAMES = ("attention_core_out", "attention_lse")
# remat_policy names of glmjax's own: (names saved on device, names offloaded to host memory).
# Everything else is recomputed in the backward, as nothing_saveable. A remat_policy may also
# spell the lists out: "save=query_proj,key_proj;offload=layer_input".
REMAT_POLICIES = {
    "save_qkv_proj": (("query_proj", "key_proj", "value_proj"), ()),
    "save_attention": (("query_proj", "key_proj", "value_proj", "attention_out"), ()),
    "save_out_proj": (("attn_out_proj", "mlp_out"), ()),
    "offload_layer_input": ((), ("layer_input",)),
    "offload_attention": ((), ("query_proj", "key_proj", "value_proj", "attention_out")),
    "offload_layer_input_save_qkv": (("query_proj", "key_proj", "value_proj"), ("layer_input",)),
}


# remat_policy "auto", resolved by the platform the step is traced for (the active mesh's
# devices; jax.default_backend() without a mesh). CPU: keep every matmul output that has no
# batch dimension and the dense attention's output and log-sum-exp, recompute only the
# elementwise rest (the attention's own products are not recomputed: BENCHMARKS.md, issue #13): faster than nothing_saveable, whose
# backward recomputes the whole forward (a third more matmul FLOPs), and as fast as no remat
# with less memory (llama-small train step, BENCHMARKS.md "Training throughput"). TPU / GPU: nothing_saveable (full remat, MaxText's "full"), the only
# choice that fits billion-parameter layers at pod batch sizes; name another to trade memory.
REMAT_AUTO = {"cpu": "dots_and_attention_saveable"}

# remat_policy names of glmjax's that save matmul outputs without batch dimensions
# (jax.checkpoint_policies.dots_with_no_batch_dims_saveable) and these named activations.
# "dots_and_attention_saveable" adds the dense attention's output and log-sum-exp, so the
# backward recomputes no attention product (only the elementwise rest: norms, RoPE, SwiGLU).
REMAT_WITH_DOTS = {"dots_and_attention_saveable": DENSE_ATTENTION_NAMES}
REMAT_AUTO_DEFAULT = "nothing_saveable"


def resolve_remat_policy(name: str, platform: str) -> str:
  """The remat_policy that runs: `name`, or for "auto" the platform's choice (REMAT_AUTO)."""
  if name != "auto":
    return name
  return REMAT_AUTO.get(platform, REMAT_AUTO_DEFAULT)


def named_remat_policy(name: str):
  """(saved names, offloaded names) of a glmjax remat_policy (REMAT_POLICIES or the spelled-out
  "save=a,b;offload=c" form), or None for a jax.checkpoint_policies name / "none".
  ValueError naming remat_policy for unknown activation names or a malformed spec."""
  if name in REMAT_POLICIES:
    return REMAT_POLICIES[name]
  if "=" not in name:
    return None
  lists = {"save": (), "offload": ()}
  for part in filter(None, (p.strip() for p in name.split(";"))):
    key, _, value = part.partition("=")
    names = tuple(filter(None, (n.strip() for n in value.split(","))))
    unknown = [n for n in names if n not in CHECKPOINT_NAMES]
    if key.strip() not in lists or unknown:
      raise ValueError(f"ModelConfig.remat_policy: {name!r} is not 'save=NAMES;offload=NAMES' with "
                       f"NAMES from {CHECKPOINT_NAMES}" + (f" (unknown: {unknown})" if unknown else ""))
    lists[key.strip()] = names
  return lists["save"], lists["offload"]


def architecture_fields(config: ModelConfig) -> dict:
  """{field: value} of every ModelConfig field except RUNTIME_FIELDS, in declaration order."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in RUNTIME_FIELDS | LOSS_FIELDS}


def _require(condition: bool, field: str, message: str):
  if not condition:
    raise ValueError(f"ModelConfig.{field}: {message}")


def _one_of(config, field: str, allowed):
  value = getattr(config, field)
  _require(value in allowed, field, f"{value!r} is not one of {tuple(allowed)}")


def validate(config: ModelConfig) -> None:
  """Raises ValueError naming the offending field and the fix."""
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "ffn_dim", "max_length"):
    value = getattr(config, field)
    _require(isinstance(value, int) and value > 0, field, f"must be a positive int, got {value!r}")
  _one_of(config, "norm", NORMS)
  _one_of(config, "norm_placement", NORM_PLACEMENTS)
  _one_of(config, "ffn", FFN_KINDS)
  _one_of(config, "position", POSITION_KINDS)
  _one_of(config, "rope_layout", ROPE_LAYOUTS)
  _one_of(config, "dtype", DTYPES)
  _one_of(config, "param_dtype", DTYPES)
  _one_of(config, "attention_impl", ATTENTION_IMPLS)
  _one_of(config, "prompt_layout", PROMPT_LAYOUTS)
  _require(config.num_heads % config.num_kv_heads == 0, "num_kv_heads",
           f"num_heads={config.num_heads} must be divisible by num_kv_heads={config.num_kv_heads} "
           "(MHA: equal, MQA: 1, GQA: a divisor)")
  _require(config.norm_eps > 0, "norm_eps", f"must be > 0, got {config.norm_eps}")
  _require(0.0 < config.rotary_fraction <= 1.0, "rotary_fraction",
           f"must be in (0, 1], got {config.rotary_fraction}")
  if config.position == "rope_2d":
    _require(config.head_dim % 4 == 0, "head_dim",
             f"rope_2d splits each head in two rotated halves, so head_dim={config.head_dim} "
             "must be a multiple of 4")
  elif config.position == "rope":
    field = "head_dim" if config.rotary_fraction == 1.0 else "rotary_fraction"
    _require(config.rotary_dim % 2 == 0 and config.rotary_dim > 0, field,
             f"rotary dim {config.rotary_dim} (head_dim={config.head_dim} x rotary_fraction="
             f"{config.rotary_fraction}) must be a positive even number")
  from glmjax.model import rope_scaling  # pylint: disable=import-outside-toplevel
  rope_scaling.validate(config, _require)
  if config.position == "sinusoidal":
    _require(config.d_model % 2 == 0, "d_model", "sinusoidal positions need an even d_model")
  if config.num_experts:
    _require(config.num_experts > 0, "num_experts", "must be >= 0")
    _require(1 <= config.experts_top_k <= config.num_experts, "experts_top_k",
             f"must be in [1, num_experts={config.num_experts}], got {config.experts_top_k}")
    _require(config.expert_capacity_factor > 0, "expert_capacity_factor", "must be > 0")
  _require(config.norm_placement == "pre" or not config.parallel_block, "parallel_block",
           f"the parallel block is pre-norm; norm_placement={config.norm_placement!r} is not supported "
           "with it (use norm_placement='pre')")
  _require(config.embed_grad_scale > 0, "embed_grad_scale", "must be > 0 (1.0 disables the shrink)")
  if (config.remat_policy not in ("none", "auto") and config.remat_policy not in REMAT_WITH_DOTS
      and named_remat_policy(config.remat_policy) is None):
    import jax  # pylint: disable=import-outside-toplevel
    _require(hasattr(jax.checkpoint_policies, config.remat_policy), "remat_policy",
             f"{config.remat_policy!r} is neither 'auto', 'none', a name in jax.checkpoint_policies "
             "(e.g. 'nothing_saveable', 'dots_saveable', 'everything_saveable'), one of glmjax's "
             f"{tuple(REMAT_POLICIES) + tuple(REMAT_WITH_DOTS)} nor 'save=NAMES;offload=NAMES' with NAMES from "
             f"{CHECKPOINT_NAMES}")
  _one_of(config, "loss_impl", LOSS_IMPLS)
  _require(isinstance(config.loss_chunk_size, int) and config.loss_chunk_size > 0, "loss_chunk_size",
           f"must be a positive int (positions per chunk), got {config.loss_chunk_size!r}")


def llama_ffn_dim(d_model: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
  """LLaMA's SwiGLU hidden size: 2/3 of 4d, times `multiplier`, rounded up to `multiple_of`."""
  hidden = int(2 * 4 * d_model / 3)
  hidden = int(multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)
