"""The decoder forward pass: embed -> scanned, rematerialised blocks -> norm -> logits.

One function serves every preset; the config picks norms, placements,
positions and FFN. The attention sublayer is split into projections, position
encoding and the attention call so the KV-cache decoder can reuse each piece.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from glmjax import pallas
from glmjax.pallas import dense
from glmjax.pallas import ring
from glmjax.model import batch as batch_lib
from glmjax.model import layers
from glmjax.model import rope_scaling
from glmjax.model import config as config_lib
from glmjax.model.config import ModelConfig
from glmjax.model.constraints import constrain

ACT_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class PositionContext:
  """Per-batch tensors every layer needs, computed once outside the layer scan."""
  segment_ids: jax.Array  # [B, L]
  bidirectional: jax.Array  # [B, L]
  rope_angles: Optional[jax.Array] = None  # [B, L, R] (rope) or None
  rope_block_angles: Optional[jax.Array] = None  # [B, L, R] (rope_2d second stream)
  alibi_slopes: Optional[jax.Array] = None  # [H]
  # Scalar bool: some query may attend a key of a later query block of the dense attention's
  # causal block skipping (glmjax.pallas.dense.reaches_a_later_block), tested once per batch here
  # rather than in every layer. None: the batch had no `bidirectional` field, so no query can
  # (the blocked form runs with no run-time test at all).
  reaches_later_block: Optional[jax.Array] = None


jax.tree_util.register_dataclass(
    PositionContext,
    data_fields=["segment_ids", "bidirectional", "rope_angles", "rope_block_angles", "alibi_slopes",
                 "reaches_later_block"],
    meta_fields=[])


def compute_dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


def validate_batch(batch: dict, config: ModelConfig) -> None:
  """Trace-time checks of the batch contract (DESIGN.md section 2)."""
  if "tokens" not in batch:
    raise ValueError(f"batch has no 'tokens'; keys are {sorted(batch)}")
  if batch["tokens"].ndim != 2:
    raise ValueError(f"batch['tokens'] must be [batch, length], got shape {batch['tokens'].shape}")
  length = batch["tokens"].shape[1]
  if length > config.max_length:
    raise ValueError(f"batch length {length} exceeds ModelConfig.max_length={config.max_length}; "
                     "shorten the sequences or raise max_length")
  for key in batch_lib.OPTIONAL_KEYS:
    if key in batch and batch[key].shape != batch["tokens"].shape:
      raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, expected "
                       f"{batch['tokens'].shape} like batch['tokens']")
  if config.position in ("learned_2d", "rope_2d") and "block_positions" not in batch:
    raise ValueError(f"position={config.position!r} needs batch['block_positions'] "
                     "(GLM Part B positions; zeros for plain text)")


def default_fields(batch: dict) -> dict:
  """Fills the optional batch fields for plain causal LM on unpacked rows (DESIGN.md s.2)."""
  return batch_lib.with_defaults(batch, jnp)


def position_context(batch: dict, config: ModelConfig, bidirectional_given: bool = True) -> PositionContext:
  """The per-batch tensors of `batch` (its optional fields filled). `bidirectional_given=False`
  says the caller's batch had no `bidirectional` field (all zeros by default), so dense
  attention's block skipping needs no run-time test."""
  rope = block = slopes = None
  if config.position == "rope":
    rope = rope_scaling.rope_angles(batch["positions"], config)
  elif config.position == "rope_2d":
    rope = rope_scaling.rope_angles(batch["positions"], config)
    block = rope_scaling.rope_angles(batch["block_positions"], config)
  elif config.position == "alibi":
    slopes = layers.alibi_slopes(config.num_heads)
  later = None
  if bidirectional_given:
    length = batch["segment_ids"].shape[-1]
    later = dense.reaches_a_later_block(batch["segment_ids"], batch["bidirectional"],
                                        dense.causal_blocks(length))
  return PositionContext(segment_ids=batch["segment_ids"], bidirectional=batch["bidirectional"],
                         rope_angles=rope, rope_block_angles=block, alibi_slopes=slopes,
                         reaches_later_block=later)


# --- Embedding --------------------------------------------------------------------------------

def embed(params: dict, batch: dict, config: ModelConfig):
  """Token (+ absolute position) embedding, optional embedding norm -> [B, L, D]."""
  table = layers.shrink_gradient(params["embed"]["embedding"], config.embed_grad_scale)
  x = jnp.take(table, batch["tokens"], axis=0)
  if config.uses_learned_positions:
    x = x + jnp.take(params["embed"]["position"], batch["positions"], axis=0)
  if config.position == "learned_2d":
    x = x + jnp.take(params["embed"]["block_position"], batch["block_positions"], axis=0)
  if config.position == "sinusoidal":
    x = x + layers.sinusoidal_embedding(batch["positions"], config.d_model)
  x = x.astype(compute_dtype(config))
  if config.embed_norm:
    x = layers.apply_norm(config.norm, params["embed_norm"], x, config.norm_eps)
  return x


# --- Attention sublayer -----------------------------------------------------------------------

def project_qkv(p: dict, x_BLD, config: ModelConfig):
  """q [B, L, H, Dh], k/v [B, L, K, Dh] before any position encoding."""
  dtype = x_BLD.dtype
  B, L, D = x_BLD.shape

  def project(w_DHK):
    _, heads, head_dim = w_DHK.shape
    return layers.matmul_2d(x_BLD, w_DHK.astype(dtype).reshape(D, heads * head_dim)).reshape(
        B, L, heads, head_dim)

  q, k, v = project(p["wq"]), project(p["wk"]), project(p["wv"])
  if "bq" in p:
    q = q + layers.bcast(p["bq"].astype(dtype), 4)
    k = k + layers.bcast(p["bk"].astype(dtype), 4)
    v = v + layers.bcast(p["bv"].astype(dtype), 4)
  # Names for the remat policies (ModelConfig.CHECKPOINT_NAMES); identities otherwise.
  return (checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"),
          checkpoint_name(v, "value_proj"))


def encode_positions(q, k, ctx: PositionContext, config: ModelConfig):
  """Applies RoPE / 2D RoPE to q and k; other schemes leave them unchanged."""
  mscale = rope_scaling.attention_factor(config)
  if config.position == "rope":
    return (layers.apply_rope(q, ctx.rope_angles, config.rope_layout, mscale),
            layers.apply_rope(k, ctx.rope_angles, config.rope_layout, mscale))
  if config.position == "rope_2d":
    return (layers.apply_rope_2d(q, ctx.rope_angles, ctx.rope_block_angles, mscale),
            layers.apply_rope_2d(k, ctx.rope_angles, ctx.rope_block_angles, mscale))
  return q, k


def project_out(p: dict, o_BLHD, config: ModelConfig):
  B, L, H, K = o_BLHD.shape
  out = layers.matmul_2d(o_BLHD.reshape(B, L, H * K), p["wo"].astype(o_BLHD.dtype).reshape(H * K, -1))
  if "bo" in p:
    out = out + layers.bcast(p["bo"].astype(o_BLHD.dtype), 3)
  return out


def attention_sublayer(p: dict, x_BLD, ctx: PositionContext, config: ModelConfig):
  q, k, v = project_qkv(p, x_BLD, config)
  q, k = encode_positions(q, k, ctx, config)
  if "prefix_k" in p:  # P-Tuning v2 (glmjax.tuning.prefix): trained keys / values at the first positions
    k, v = layers.with_prefix(k, p["prefix_k"]), layers.with_prefix(v, p["prefix_v"])
  later = False if ctx.reaches_later_block is None else ctx.reaches_later_block
  if k.shape[1] != ctx.segment_ids.shape[-1]:
    later = None  # keys other than the batch's own: dense attention tests them itself
  o = pallas.attention(q, k, v, segment_ids=ctx.segment_ids, bidirectional=ctx.bidirectional,
                       alibi_slopes=ctx.alibi_slopes, impl=config.attention_impl,
                       reaches_later_block=later)
  return checkpoint_name(project_out(p, checkpoint_name(o, "attention_out"), config), "attn_out_proj")


def mlp_sublayer(p: dict, x_BLD, ctx: PositionContext, config: ModelConfig):
  """Returns (output, auxiliary loss); the loss is 0 for dense FFNs."""
  dtype = x_BLD.dtype
  if config.num_experts:
    # Under context parallelism the layers see the sequence in zig-zag order; expert capacity
    # slots go to tokens first come first served in token order, so routing runs in the
    # sequence's own order (else a different token overflows an expert than on one device).
    context = ring.context_size()
    out, aux = layers.moe_ffn(p, ring.from_zigzag(x_BLD, context),
                              ring.from_zigzag(ctx.segment_ids != 0, context),
                              activation=config.ffn_activation, gated=config.ffn_gated,
                              top_k=config.experts_top_k,
                              capacity_factor=config.expert_capacity_factor, dtype=dtype)
    return ring.to_zigzag(out, context), aux
  return layers.dense_ffn(p, x_BLD, config.ffn_activation, config.ffn_gated, dtype), jnp.zeros((), jnp.float32)


# --- Block ------------------------------------------------------------------------------------

def block(layer: dict, x, ctx: PositionContext, config: ModelConfig, attn=None):
  """One transformer layer under the configured norm placement. Returns (x, aux_loss).

  `attn(p, h) -> out` replaces the attention sublayer when given (the KV-cache
  decoder in glmjax.model.decode passes one that reads and writes its cache).

  pre:      x + f(N(x))                       (GPT-2, LLaMA)
  post:     N(x + f(x))                       (original Transformer)
  sandwich: x + N_post(f(N(x)))               (CogView / GLM)
  deepnorm: n = N(x); alpha * n + f(n)        (GLM-130B: DeepNorm with alpha = (2N)^0.5,
                                               the LN of the next sublayer closing the residual)
  parallel: x + attn(N(x)) + mlp(N(x))        (PaLM; GPT-NeoX with a second norm)
  """
  norm = functools.partial(layers.apply_norm, config.norm, eps=config.norm_eps)
  attn = attn or functools.partial(attention_sublayer, ctx=ctx, config=config)
  mlp = _named_mlp(functools.partial(mlp_sublayer, ctx=ctx, config=config))
  placement = config.norm_placement
  if config.parallel_block:
    h = norm(layer["attn_norm"], x)
    h_mlp = h if config.parallel_shared_norm else norm(layer["mlp_norm"], x)
    mlp_out, aux = mlp(layer["mlp"], h_mlp)
    return x + attn(layer["attn"], h) + mlp_out, aux
  if placement == "pre":
    x = x + attn(layer["attn"], norm(layer["attn_norm"], x))
    mlp_out, aux = mlp(layer["mlp"], norm(layer["mlp_norm"], x))
    return x + mlp_out, aux
  if placement == "post":
    x = norm(layer["attn_norm"], x + attn(layer["attn"], x))
    mlp_out, aux = mlp(layer["mlp"], x)
    return norm(layer["mlp_norm"], x + mlp_out), aux
  if placement == "sandwich":
    x = x + norm(layer["attn_post_norm"], attn(layer["attn"], norm(layer["attn_norm"], x)))
    mlp_out, aux = mlp(layer["mlp"], norm(layer["mlp_norm"], x))
    return x + norm(layer["mlp_post_norm"], mlp_out), aux
  if placement == "deepnorm":
    alpha = config.deepnorm_alpha
    h = norm(layer["attn_norm"], x)
    x = h * alpha + attn(layer["attn"], h)
    h = norm(layer["mlp_norm"], x)
    mlp_out, aux = mlp(layer["mlp"], h)
    return h * alpha + mlp_out, aux
  raise ValueError(f"ModelConfig.norm_placement={placement!r} is not supported")


def _named_mlp(mlp):
  def named(p, h):
    out, aux = mlp(p, h)
    return checkpoint_name(out, "mlp_out"), aux
  return named


def remat_policy(name: str):
  """The jax.checkpoint policy of ModelConfig.remat_policy `name`: a jax.checkpoint_policies
  name, or one of glmjax's (config.REMAT_POLICIES, "save=...;offload=..."): the named
  activations saved on device or offloaded to host memory (`pinned_host`; on a CPU backend that
  is the same memory, so the policy runs there too and only TPU / GPU save HBM), the rest
  recomputed."""
  if name in config_lib.REMAT_WITH_DOTS:
    return jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*config_lib.REMAT_WITH_DOTS[name]))
  named = config_lib.named_remat_policy(name)
  if named is None:
    return getattr(jax.checkpoint_policies, name)
  saved, offloaded = named
  if not offloaded:
    return jax.checkpoint_policies.save_only_these_names(*saved)
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
      offload_src="device", offload_dst="pinned_host")


def traced_platform() -> str:
  """The platform the computation being traced will run on: the active mesh's devices (so an
  AOT compile for a TPU topology from a CPU host says "tpu"), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def remat(fn, config: ModelConfig):
  name = config_lib.resolve_remat_policy(config.remat_policy, traced_platform())
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=remat_policy(name), prevent_cse=False)


def run_layers(layer_params: dict, x, ctx: PositionContext, config: ModelConfig):
  """All layers by `lax.scan` over the stacked `layers` axis (compile time flat in depth)."""

  def body(carry, layer):
    carry = checkpoint_name(carry, "layer_input")
    y, aux = block(layers.materialize(layer), carry, ctx, config)
    return constrain(y, ACT_AXES), aux

  x, aux_per_layer = jax.lax.scan(remat(body, config), x, layer_params)
  return x, jnp.sum(aux_per_layer)


# --- Head -------------------------------------------------------------------------------------

def final_hidden(params: dict, x_BLD, config: ModelConfig):
  """The final norm (when the placement has one): what the vocabulary projection reads."""
  if config.has_final_norm:
    x_BLD = layers.apply_norm(config.norm, params["final_norm"], x_BLD, config.norm_eps)
  return x_BLD


def head_logits(params: dict, h_BLD, config: ModelConfig):
  """The vocabulary projection of final hidden states; float32 logits [B, L, V] (or [..., V] of
  any leading shape: a chunk of positions in glmjax.trainer.loss.chunked_token_loss_sums)."""
  if config.tie_embeddings:
    kernel = params["embed"]["embedding"].astype(h_BLD.dtype).T
  else:
    kernel = params["lm_head"]["kernel"].astype(h_BLD.dtype)
  logits = layers.matmul_2d(h_BLD, kernel, preferred_element_type=jnp.float32)
  if config.lm_head_bias:
    logits = logits + layers.bcast(params["lm_head"]["bias"].astype(jnp.float32), logits.ndim)
  return logits.astype(jnp.float32)


def head_params(params: dict, config: ModelConfig) -> dict:
  """The params `head_logits` reads (so a chunked loss differentiates only these per chunk)."""
  out = {}
  if config.tie_embeddings:
    out["embed"] = {"embedding": params["embed"]["embedding"]}
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"]
  return out


def logits_from_hidden(params: dict, x_BLD, config: ModelConfig):
  """Final norm and vocabulary projection; float32 logits [B, L, V]."""
  return head_logits(params, final_hidden(params, x_BLD, config), config)


def hidden_with_aux(params: dict, batch: dict, config: ModelConfig) -> tuple[jax.Array, dict[str, Any]]:
  """The last layer's output [B, L, D] (compute dtype, before the final norm) and the auxiliary
  outputs: `forward_with_aux` without the head, for a loss that never holds [B, L, V] logits."""
  validate_batch(batch, config)
  bidirectional_given = "bidirectional" in batch
  batch = default_fields(batch)
  context = ring.context_size()  # > 1: the sequence is split over devices, in zig-zag order
  if context > 1:
    ring.check_length(batch["tokens"].shape[1], context)
    batch = {key: ring.to_zigzag(value, context) for key, value in batch.items()}
  ctx = position_context(batch, config, bidirectional_given)
  x = constrain(embed(params, batch, config), ACT_AXES)
  x, moe_aux = run_layers(params["layers"], x, ctx, config)
  x = constrain(ring.from_zigzag(x, context), ACT_AXES)
  aux = {"moe_aux_loss": moe_aux / config.num_layers if config.num_experts else moe_aux}
  return x, aux


def forward_with_aux(params: dict, batch: dict, config: ModelConfig) -> tuple[jax.Array, dict[str, Any]]:
  """Logits [B, L, V] (float32) and auxiliary outputs ({"moe_aux_loss": scalar})."""
  x, aux = hidden_with_aux(params, batch, config)
  return logits_from_hidden(params, x, config), aux


def forward(params: dict, batch: dict, config: ModelConfig) -> jax.Array:
  """Logits [batch, length, vocab] in float32 (contract, DESIGN.md section 2)."""
  return forward_with_aux(params, batch, config)[0]
