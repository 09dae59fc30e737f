"""Pipeline parallelism over the `stage` mesh axis: GPipe and the circular (interleaved) schedule.

GPipe (Huang et al. 2019): the stacked `layers` axis of the params is split over `stage`
(logical rule `layers` -> `stage`), so stage s holds layers [s N/S, (s + 1) N/S). The batch is
cut into M microbatches (rows m, M + m, 2M + m, ..., as glmjax.trainer.step.split_microbatches).
Embedding and head run outside the pipeline on all microbatches; the layers run under
`shard_map` over `stage` only (the other mesh axes stay automatic, so it composes with data /
fsdp / tensor): at clock t = 0 .. M + S - 2 stage s runs its layers on microbatch t - s (idle
when that is outside [0, M): the bubble, (S - 1) / (M + S - 1) of the clock ticks) and passes
the activation to stage s + 1 with `ppermute`.

Circular (MaxText's pipeline with `num_pipeline_repeats`; the layer assignment of the
interleaved 1F1B schedule, Narayanan et al. 2021, sec. 2.2): the layers are cut into S R
chunks of C = N / (S R) layers and stage s holds chunks s, S + s, 2S + s, ... (R of them).
A microbatch loops around the ring R times; at tick t = 0 .. R M + S - 2 stage s works on item
k = t - s (microbatch k mod M, repeat k div M, valid for 0 <= k < R M) with its chunk of
repeat k div M, and passes the activation to stage (s + 1) mod S. The last stage's output of
repeat r is stage 0's input of repeat r + 1, M - S + 1 ticks later (kept in a per-microbatch
buffer; this needs M >= S). A tick is C layers instead of GPipe's N / S, so the bubble is
(S - 1) / (R M + S - 1). GPipe is the case R = 1.

Param layout: the checkpointed params keep the natural layer order (a checkpoint of a circular
run loads anywhere). Inside the step `circular_layout` reorders the stacked `layers` axis
([R, S, C] -> [S, R, C], a transpose XLA lowers to one exchange of the layer params over
`stage`; its gradient is the inverse transpose), so the contiguous `stage` split hands stage s
its R chunks.

With a `context` axis > 1 the batch is put in zig-zag order before the stages and back after
them (as glmjax.model.transformer.hidden_with_aux), and each stage's attention is ring attention
over `context` (glmjax.pallas.ring; its shard_map nests inside the one over `stage`).

The last stage's outputs are summed over `stage` (every other stage contributes zeros).
Gradients are autodiff of this program: all forwards, then all backwards in reverse, with the
model's per-layer remat inside each chunk.

`forward_with_aux(params, batch, config, microbatches=M, repeats=R)` has the meaning of
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


def check_layers(config: ModelConfig, stages: int, repeats: int = 1) -> None:
  """One-line ValueError naming the fields when the layers do not split into stages x repeats."""
  if config.num_layers % stages:
    raise ValueError(f"MeshConfig.stage={stages} must divide ModelConfig.num_layers="
                     f"{config.num_layers} (each stage holds num_layers / stage layers)")
  if config.num_layers % (stages * repeats):
    raise ValueError(f"MeshConfig.pipeline_repeats={repeats} must divide ModelConfig.num_layers / "
                     f"MeshConfig.stage = {config.num_layers // stages} (each stage holds pipeline_repeats "
                     "equal chunks of layers)")


def check(config: ModelConfig, stages: int, microbatches: int, batch_size: int, repeats: int = 1) -> None:
  """One-line ValueErrors naming the field for a pipeline that cannot be scheduled."""
  check_layers(config, stages, repeats)
  if microbatches < stages:
    raise ValueError(f"microbatches={microbatches} is fewer than MeshConfig.stage={stages}: some "
                     "stage would never run; use at least as many microbatches as stages")
  if batch_size % microbatches:
    raise ValueError(f"microbatches={microbatches} must divide the batch size {batch_size}")


def circular_layout(layer_params, stages: int, repeats: int):
  """The stacked [N, ...] layer params reordered so that the contiguous `stage` split gives
  stage s the chunks s, S + s, ..., (R - 1) S + s (in that order): [R, S, C] -> [S, R, C].
  Identity for R = 1 (GPipe)."""
  if repeats == 1:
    return layer_params

  def reorder(a):
    n = a.shape[0]
    chunks = a.reshape((repeats, stages, n // (stages * repeats)) + a.shape[1:])
    return jnp.swapaxes(chunks, 0, 1).reshape(a.shape)
  return jax.tree.map(reorder, layer_params)


def circular_order(num_layers: int, stages: int, repeats: int) -> list[int]:
  """The layer index at each position of `circular_layout` (a plain-Python reference)."""
  chunk = num_layers // (stages * repeats)
  return [(r * stages + s) * chunk + c for s in range(stages) for r in range(repeats) for c in range(chunk)]


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle share of the stage-ticks: (S - 1) / (R M + S - 1) (GPipe for R = 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def split(x, microbatches: int):
  """[B, ...] -> [M, B / M, ...], microbatch m = rows m, M + m, ... (step.split_microbatches)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // microbatches, microbatches) + x.shape[1:]), 0, 1)


def merge(x):
  """Inverse of `split`."""
  m, b = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape((m * b,) + x.shape[2:])


@jax.tree_util.register_pytree_node_class
class RepeatPick:
  """One layer's weights of all R chunks ([R, ...]) and the chunk to use: glmjax.model.layers
  .materialize calls `dense()` inside the layer scan's (remat'd) body, so the pick is part of
  the recomputed layer (the layer scan slices `stack` and `index` along their leading axis)."""

  def __init__(self, stack, index):
    self.stack, self.index = stack, index

  def tree_flatten(self):
    return (self.stack, self.index), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  def dense(self):
    picked = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, keepdims=False), self.stack)
    return picked.dense() if _packed(picked) else picked


def _packed(x) -> bool:
  """Weights in another form (glmjax.tuning's LoraWeight), as glmjax.model.layers.materialize sees them."""
  return hasattr(x, "dense") and not hasattr(x, "shape")


def _stage_body(layer_params, x_all, ctx_all, *, config: ModelConfig, stages: int, microbatches: int,
                repeats: int):
  """Per-stage program under shard_map: the clock loop over R M + S - 1 ticks (module docstring),
  a `lax.scan` over the ticks (compile time flat in M and R).

  `layer_params` is this stage's [R C, ...] block of the circular layout; at tick t the stage
  works on item k = t - s: microbatch k mod M with its chunk k div M. Stage 0's input is the
  embedding (repeat 0) or the loop buffer: the last stage's output of the previous repeat,
  which arrives S ticks after that stage started it and waits there M - S ticks."""
  stage = jax.lax.axis_index(STAGE_AXIS)
  chunks = jax.tree.map(lambda a: a.reshape((repeats, a.shape[0] // repeats) + a.shape[1:]), layer_params)
  ring_pairs = [(i, (i + 1) % stages) for i in range(stages if repeats > 1 else stages - 1)]
  work = repeats * microbatches  # items per stage
  at = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731

  def put(buffer, slot, value, keep):
    """buffer with buffer[slot] = value where `keep`, else unchanged."""
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(keep, value, at(buffer, slot)), slot, 0)

  def run_chunk(chunks, repeat, x, ctx):
    """This stage's chunk `repeat` of layers on x. GPipe's one chunk is a loop invariant (the
    backward reads the weights in place). A circular stage's layer scan runs over its layers
    with all R chunks' weights of each layer (`RepeatPick`), picking chunk `repeat` inside the
    model's remat'd layer body: the backward recomputes the pick from the loop-invariant
    weights instead of keeping a copy per tick (under ModelConfig.remat_policy 'none' the body
    is not remat'd and the picks are kept, R M + S - 1 chunk copies per stage)."""
    if repeats == 1:
      return transformer.run_layers(jax.tree.map(lambda a: a[0], chunks), x, ctx, config)
    size = jax.tree.leaves(chunks)[0].shape[1]  # C layers per chunk
    index = jnp.full((size,), repeat, jnp.int32)
    by_layer = jax.tree.map(  # [C, R, ...]; weights held in another form (LoRA) are picked whole
        lambda w: RepeatPick(jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), w), index), chunks, is_leaf=_packed)
    return transformer.run_layers(by_layer, x, ctx, config)

  def tick(carry, t):
    state, loop, outputs, aux_total = carry
    if repeats > 1:
      received = t - stages  # the item whose last-stage output `state` holds on stage 0 now
      loop = put(loop, jnp.clip(received, 0, work - 1) % microbatches, state,
                 (received >= 0) & (received < work - microbatches))
      first = jnp.minimum(t, work - 1)  # stage 0's item
      first_input = jnp.where(first < microbatches, at(x_all, first % microbatches),
                              at(loop, first % microbatches))
    else:
      first_input = at(x_all, jnp.minimum(t, microbatches - 1))
    inputs = jnp.where(stage == 0, first_input, state)
    item = t - stage
    valid = (item >= 0) & (item < work)
    safe = jnp.clip(item, 0, work - 1)
    ctx = jax.tree.map(lambda a: at(a, safe % microbatches), ctx_all)
    y, aux = run_chunk(chunks, safe // microbatches, inputs, ctx)
    aux_total = aux_total + jnp.where(valid, aux, 0.0)
    done = t - (stages - 1)  # the last stage's item at this tick; its final repeat finishes a microbatch
    outputs = put(outputs, jnp.clip(done, 0, work - 1) % microbatches, y.astype(outputs.dtype),
                  (stage == stages - 1) & (done >= work - microbatches))
    return (jax.lax.ppermute(y, STAGE_AXIS, ring_pairs), loop, outputs, aux_total), None

  zeros = jnp.zeros_like(x_all)
  carry = (jnp.zeros_like(x_all[0]), zeros if repeats > 1 else None, zeros, jnp.zeros((), jnp.float32))
  (_, _, outputs, aux_total), _ = jax.lax.scan(tick, carry, jnp.arange(work + stages - 1))
  return jax.lax.psum(outputs, STAGE_AXIS), jax.lax.psum(aux_total, STAGE_AXIS)


def _hidden_all(params: dict, batch: dict, config: ModelConfig, microbatches: int, repeats: int):
  """The last layer's outputs [M, B / M, L, D] and the summed MoE aux of the pipeline."""
  stages = stage_count()
  transformer.validate_batch(batch, config)
  batch = transformer.default_fields(batch)
  check(config, stages, microbatches, batch["tokens"].shape[0], repeats)
  context = ring.context_size()  # > 1: each stage's layers see the sequence split, in zig-zag order
  if context > 1:
    ring.check_length(batch["tokens"].shape[1], context)
    batch = {key: ring.to_zigzag(value, context) for key, value in batch.items()}
  parts = jax.tree.map(lambda x: split(x, microbatches), batch)
  ctx_all = jax.vmap(lambda b: transformer.position_context(b, config))(parts)
  x_all = split(transformer.embed(params, batch, config), microbatches)
  if stages == 1:
    body = lambda lp, x, c: _stage_body_single(lp, x, c, config)  # noqa: E731
    h_all, aux = body(params["layers"], x_all, ctx_all)
  else:
    mesh = jax.sharding.get_abstract_mesh()
    fn = lambda lp, x, c: _stage_body(lp, x, c, config=config, stages=stages,  # noqa: E731
                                      microbatches=microbatches, repeats=repeats)
    layer_specs = jax.tree.map(lambda _: P(STAGE_AXIS), params["layers"])
    h_all, aux = jax.shard_map(fn, mesh=mesh, in_specs=(layer_specs, P(), P()), out_specs=(P(), P()),
                               axis_names=frozenset({STAGE_AXIS}), check_vma=False)(
                                   circular_layout(params["layers"], stages, repeats), x_all, ctx_all)
  h_all = jax.vmap(lambda h: ring.from_zigzag(h, context))(h_all)
  aux = aux / microbatches
  return h_all, {"moe_aux_loss": aux / config.num_layers if config.num_experts else aux}


def forward_with_aux(params: dict, batch: dict, config: ModelConfig, *, microbatches: int,
                     repeats: int = 1):
  """Logits [B, L, V] and {"moe_aux_loss"} as glmjax.model.forward_with_aux, the layers run as a
  pipeline over the active mesh's `stage` axis: GPipe (repeats 1) or circular with `repeats`
  chunks per stage (see the module docstring)."""
  h_all, aux = _hidden_all(params, batch, config, microbatches, repeats)
  logits = merge(jax.vmap(lambda h: transformer.logits_from_hidden(params, h, config))(h_all))
  return logits, aux


def hidden_with_aux(params: dict, batch: dict, config: ModelConfig, *, microbatches: int,
                    repeats: int = 1):
  """The last layer's outputs [B, L, D] and {"moe_aux_loss"} as
  glmjax.model.transformer.hidden_with_aux, through the pipeline (a chunked loss's input)."""
  h_all, aux = _hidden_all(params, batch, config, microbatches, repeats)
  return merge(h_all), aux


def _stage_body_single(layer_params, x_all, ctx_all, config):
  """One stage: the microbatches one after another (no mesh axis to pipeline over)."""
  def run(x, ctx):
    return transformer.run_layers(layer_params, x, ctx, config)
  h, aux = jax.lax.map(lambda args: run(*args), (x_all, ctx_all))
  return h, jnp.sum(aux)
