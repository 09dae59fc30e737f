"""Pipeline parallelism over the `stage` mesh axis: GPipe (Huang et al. 2019).

The stacked `layers` axis of the params is split over `stage` (logical rule `layers` ->
`stage`), so stage s holds layers [s N/S, (s + 1) N/S). The batch is cut into M microbatches
(rows m, M + m, 2M + m, ..., as glmjax.trainer.step.split_microbatches). Embedding and head
run outside the pipeline on all microbatches; the layers run under `shard_map` over `stage`
only (the other mesh axes stay automatic, so it composes with data / fsdp / tensor): at clock
t = 0 .. M + S - 2 stage s runs its layers on microbatch t - s (idle when that is outside
[0, M): the bubble, (S - 1) / (M + S - 1) of the clock ticks) and passes the activation to
stage s + 1 with `ppermute`. The last stage's outputs are summed over `stage` (every other
stage contributes zeros). Gradients are autodiff of this program: all forwards, then all
backwards in reverse (GPipe's schedule), with the model's per-layer remat inside each stage.

`forward_with_aux(params, batch, config, microbatches=M)` has the meaning of
glmjax.model.forward_with_aux: the same logits (up to float rounding). MoE auxiliary losses
are the mean over microbatches (routing capacity per microbatch, as gradient accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glmjax.model import transformer
from glmjax.model.config import ModelConfig
from glmjax.pallas import ring

STAGE_AXIS = "stage"


def stage_count() -> int:
  """Size of the `stage` axis of the active mesh (1 when there is none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or STAGE_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[STAGE_AXIS])


def check(config: ModelConfig, stages: int, microbatches: int, batch_size: int) -> None:
  """One-line ValueErrors naming the field for a pipeline that cannot be scheduled."""
  if config.num_layers % stages:
    raise ValueError(f"MeshConfig.stage={stages} must divide ModelConfig.num_layers="
                     f"{config.num_layers} (each stage holds num_layers / stage layers)")
  if microbatches < stages:
    raise ValueError(f"microbatches={microbatches} is fewer than MeshConfig.stage={stages}: some "
                     "stage would never run; use at least as many microbatches as stages")
  if batch_size % microbatches:
    raise ValueError(f"microbatches={microbatches} must divide the batch size {batch_size}")
  if stages > 1 and ring.context_size() > 1:
    raise ValueError(f"MeshConfig.context={ring.context_size()} with MeshConfig.stage={stages}: "
                     "context parallelism inside pipeline stages is not implemented; use one of them")


def split(x, microbatches: int):
  """[B, ...] -> [M, B / M, ...], microbatch m = rows m, M + m, ... (step.split_microbatches)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // microbatches, microbatches) + x.shape[1:]), 0, 1)


def merge(x):
  """Inverse of `split`."""
  m, b = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape((m * b,) + x.shape[2:])


def _stage_body(layer_params, x_all, ctx_all, *, config: ModelConfig, stages: int, microbatches: int):
  """Per-stage program under shard_map: GPipe's clock loop over M + S - 1 ticks."""
  stage = jax.lax.axis_index(STAGE_AXIS)
  forward_ring = [(i, i + 1) for i in range(stages - 1)]
  state = jnp.zeros_like(x_all[0])
  outputs = jnp.zeros_like(x_all)
  aux_total = jnp.zeros((), jnp.float32)
  for tick in range(microbatches + stages - 1):
    index = tick - stage  # the microbatch this stage works on at this tick
    valid = (index >= 0) & (index < microbatches)
    safe = jnp.clip(index, 0, microbatches - 1)
    inputs = jnp.where(stage == 0, x_all[min(tick, microbatches - 1)], state)
    ctx = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, safe, keepdims=False), ctx_all)
    y, aux = transformer.run_layers(layer_params, inputs, ctx, config)
    aux_total = aux_total + jnp.where(valid, aux, 0.0)
    done = tick - (stages - 1)  # the microbatch the last stage finishes at this tick
    if done >= 0:
      outputs = outputs.at[done].set(jnp.where(stage == stages - 1, y, 0.0).astype(outputs.dtype))
    if tick + 1 < microbatches + stages - 1:
      state = jax.lax.ppermute(y, STAGE_AXIS, forward_ring)
  return jax.lax.psum(outputs, STAGE_AXIS), jax.lax.psum(aux_total, STAGE_AXIS)


def _hidden_all(params: dict, batch: dict, config: ModelConfig, microbatches: int):
  """The last layer's outputs [M, B / M, L, D] and the summed MoE aux of the pipeline."""
  stages = stage_count()
  transformer.validate_batch(batch, config)
  batch = transformer.default_fields(batch)
  check(config, stages, microbatches, batch["tokens"].shape[0])
  parts = jax.tree.map(lambda x: split(x, microbatches), batch)
  ctx_all = jax.vmap(lambda b: transformer.position_context(b, config))(parts)
  x_all = split(transformer.embed(params, batch, config), microbatches)
  if stages == 1:
    body = lambda lp, x, c: _stage_body_single(lp, x, c, config)  # noqa: E731
    h_all, aux = body(params["layers"], x_all, ctx_all)
  else:
    mesh = jax.sharding.get_abstract_mesh()
    fn = lambda lp, x, c: _stage_body(lp, x, c, config=config, stages=stages,  # noqa: E731
                                      microbatches=microbatches)
    layer_specs = jax.tree.map(lambda _: P(STAGE_AXIS), params["layers"])
    h_all, aux = jax.shard_map(fn, mesh=mesh, in_specs=(layer_specs, P(), P()), out_specs=(P(), P()),
                               axis_names=frozenset({STAGE_AXIS}), check_vma=False)(
                                   params["layers"], x_all, ctx_all)
  aux = aux / microbatches
  return h_all, {"moe_aux_loss": aux / config.num_layers if config.num_experts else aux}


def forward_with_aux(params: dict, batch: dict, config: ModelConfig, *, microbatches: int):
  """Logits [B, L, V] and {"moe_aux_loss"} as glmjax.model.forward_with_aux, the layers run as a
  GPipe pipeline over the active mesh's `stage` axis (see the module docstring)."""
  h_all, aux = _hidden_all(params, batch, config, microbatches)
  logits = merge(jax.vmap(lambda h: transformer.logits_from_hidden(params, h, config))(h_all))
  return logits, aux


def hidden_with_aux(params: dict, batch: dict, config: ModelConfig, *, microbatches: int):
  """The last layer's outputs [B, L, D] and {"moe_aux_loss"} as
  glmjax.model.transformer.hidden_with_aux, through the pipeline (a chunked loss's input)."""
  h_all, aux = _hidden_all(params, batch, config, microbatches)
  return merge(h_all), aux


def _stage_body_single(layer_params, x_all, ctx_all, config):
  """One stage: the microbatches one after another (no mesh axis to pipeline over)."""
  def run(x, ctx):
    return transformer.run_layers(layer_params, x, ctx, config)
  h, aux = jax.lax.map(lambda args: run(*args), (x_all, ctx_all))
  return h, jnp.sum(aux)
