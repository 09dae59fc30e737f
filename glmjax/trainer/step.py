"""The jitted train / eval steps on a device mesh.

`TrainProgram` binds a model, optimizer and mesh: it creates the train state
already sharded (`jit` with `out_shardings`: params and optimizer state are
never whole on one host), turns host batches into global arrays, and runs

    state, metrics = program.train_step(state, batch)   # donated state, in/out shardings
    state, metrics = program.train_steps(state, [batch_1, ..., batch_n])  # n updates, one call

`train_steps` runs the same step n times inside one executable (a `lax.scan` over the batches;
metrics come back with a leading [n]), bit for bit the updates of n `train_step` calls. On
CPU it is faster: XLA:CPU maps the step's temporaries afresh at every execution (1.15 GiB for
llama-small, faulted in 4 KiB at a time), so one execution per n steps pays that once
(`steps_per_call`, BENCHMARKS.md "Training throughput").

Loss: token cross-entropy weighted by `loss_mask`, divided by the number of
counted tokens in the whole (global) batch, plus `z_loss` * mean(log Z^2) and
the model's MoE auxiliary loss. With `microbatches` > 1 the batch is split
into interleaved microbatches whose gradients are summed, each already divided
by the big batch's token count, so the update equals the big batch's. With a `stage` mesh
axis > 1 the microbatches are GPipe's instead (glmjax.trainer.pipeline): the same update.
Non-finite loss or gradient norm: the update is skipped (params and optimizer
state kept) and counted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glmjax import sharding as shd
from glmjax.model import ModelConfig, forward_with_aux, init_params, transformer
from glmjax.model.batch import BATCH_KEYS
from glmjax.model.batch import dtype_of as batch_dtype
from glmjax.model.constraints import constrain
from glmjax.trainer import loss as loss_lib
from glmjax.trainer import optim
from glmjax.trainer import pipeline


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the compiled step needs beyond model and optimizer."""
  microbatches: int = 1
  z_loss: float = 0.0
  pipeline_repeats: int = 1  # with stage > 1: layer chunks per stage (TrainProgram: MeshConfig's)


def new_state(params, opt_state, rng) -> dict:
  """Train state (a plain dict so checkpoints are plain trees)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng,
          "nonfinite_streak": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """[B, L] -> [M, B/M, L], microbatch m = rows m, M+m, 2M+m, ...

  Interleaving keeps every microbatch spread over all batch shards: a device
  holding a contiguous block of rows holds rows of every microbatch.
  """
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // microbatches, microbatches) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def token_sums_and_aux(params, batch: dict, model_config: ModelConfig, forward=forward_with_aux,
                       hidden_forward=transformer.hidden_with_aux):
  """(loss_lib sums, aux) of `batch`: from [B, L, V] logits (`forward`) with
  ModelConfig.loss_impl 'dense', or with 'chunked' from the last hidden states (`hidden_forward`)
  through the head `loss_chunk_size` positions at a time (loss.chunked_token_loss_sums)."""
  if model_config.loss_impl == "chunked":
    x, aux = hidden_forward(params, batch, model_config)
    h = transformer.final_hidden(params, x, model_config)
    head = lambda hp, h_chunk: transformer.head_logits(hp, h_chunk, model_config)  # noqa: E731
    sums = loss_lib.chunked_token_loss_sums(
        head, transformer.head_params(params, model_config), h, batch["targets"],
        batch["loss_mask"], model_config.loss_chunk_size)
    return sums, aux
  logits, aux = forward(params, batch, model_config)
  return loss_lib.token_loss_sums(logits, batch["targets"], batch["loss_mask"]), aux


def loss_and_sums(params, batch: dict, model_config: ModelConfig, total_weight, z_loss: float,
                  aux_scale: float, forward=forward_with_aux,
                  hidden_forward=transformer.hidden_with_aux):
  """(objective, sums): objective = (nll + z * z_sum) / total_weight + aux_scale * moe_aux."""
  sums, aux = token_sums_and_aux(params, batch, model_config, forward, hidden_forward)
  moe = aux["moe_aux_loss"]
  weight = model_config.router_aux_loss_weight if model_config.num_experts else 0.0
  objective = (sums["nll_sum"] + z_loss * sums["z_sum"]) / total_weight + weight * aux_scale * moe
  return objective, {**sums, "moe_aux_sum": moe * aux_scale}


def float_grad(fn):
  """jax.grad(fn, has_aux=True) over the floating-point leaves of the first argument; integer
  leaves (a quantized frozen base, glmjax.tuning.quant) get zero gradients of their own dtype."""
  def wrapped(params, *args):
    leaves, treedef = jax.tree.flatten(params)
    floats = [x if jnp.issubdtype(x.dtype, jnp.inexact) else None for x in leaves]

    def of_floats(fl, *rest):
      return fn(jax.tree.unflatten(treedef, [x if f is None else f for f, x in zip(fl, leaves)]), *rest)
    grads, aux = jax.grad(of_floats, has_aux=True)(floats, *args)
    return jax.tree.unflatten(treedef, [jnp.zeros_like(x) if g is None else g
                                        for g, x in zip(grads, leaves)]), aux
  return wrapped


# The LM train step hands `tuning.train_forward(key, forward)` the per-step key (LoRA dropout;
# glmjax.tuning.lora.dropout_wired checks this).
TUNING_TRAIN_FORWARD = True


def gradients(params, batch: dict, model_config: ModelConfig, step_config: StepConfig, dropout=None):
  """(grads, sums) of the whole batch, accumulated over microbatches when asked.

  `dropout` = (key, tuning): the forwards are tuning.train_forward(key, f) (train-mode LoRA
  dropout); with microbatches, microbatch i's key is fold_in(key, i)."""
  total_weight = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  grad_fn = float_grad(loss_and_sums)
  m = step_config.microbatches

  def forwards(forward, hidden, index=None):
    if dropout is None:
      return forward, hidden
    key, tuning = dropout
    key = key if index is None else jax.random.fold_in(key, index)
    return tuning.train_forward(key, forward), tuning.train_forward(key, hidden)

  if pipeline.stage_count() > 1:  # the microbatches flow through the `stage` axis (GPipe / circular)
    schedule = {"microbatches": m, "repeats": step_config.pipeline_repeats}
    forward, hidden = forwards(functools.partial(pipeline.forward_with_aux, **schedule),
                               functools.partial(pipeline.hidden_with_aux, **schedule))
    return grad_fn(params, batch, model_config, total_weight, step_config.z_loss, 1.0, forward,
                   hidden)
  if m == 1:
    return grad_fn(params, batch, model_config, total_weight, step_config.z_loss, 1.0,
                   *forwards(forward_with_aux, transformer.hidden_with_aux))

  def body(acc, indexed):
    index, microbatch = indexed
    microbatch = {k: constrain(v, ("batch", "length")) for k, v in microbatch.items()}
    grads, sums = grad_fn(params, microbatch, model_config, total_weight, step_config.z_loss, 1.0 / m,
                          *forwards(forward_with_aux, transformer.hidden_with_aux, index))
    acc_grads, acc_sums = acc
    return (jax.tree.map(jnp.add, acc_grads, grads), jax.tree.map(jnp.add, acc_sums, sums)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zero_sums = {k: jnp.zeros((), jnp.float32)
               for k in ("nll_sum", "z_sum", "correct_sum", "weight_sum", "moe_aux_sum")}
  (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (jnp.arange(m), split_microbatches(batch, m)))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return grads, sums


def guarded_update(state: dict, grads, loss, optimizer) -> tuple[dict, dict]:
  """The optimizer update of `state`, skipped (params and optimizer state kept) when the loss or
  the gradient norm is not finite; (new state, {grad_norm, finite, nonfinite_streak})."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  streak = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
  new = {**state, "step": state["step"] + 1, "params": keep(params, state["params"]),
         "opt_state": keep(opt_state, state["opt_state"]), "nonfinite_streak": streak,
         "nonfinite_total": state["nonfinite_total"] + (1 - finite.astype(jnp.int32))}
  return new, {"grad_norm": grad_norm, "finite": finite, "nonfinite_streak": streak}


def train_step(state: dict, batch: dict, *, model_config: ModelConfig, optimizer, schedule,
               step_config: StepConfig, tuning=None):
  dropout = None
  if tuning is not None and hasattr(tuning, "train_forward"):
    dropout = (jax.random.fold_in(state["rng"], state["step"]), tuning)
  grads, sums = gradients(state["params"], batch, model_config, step_config, dropout)
  weight = jnp.maximum(sums["weight_sum"], 1.0)
  nll = sums["nll_sum"] / weight
  z_term = step_config.z_loss * sums["z_sum"] / weight
  moe_weight = model_config.router_aux_loss_weight if model_config.num_experts else 0.0
  loss = nll + z_term + moe_weight * sums["moe_aux_sum"]
  new, update = guarded_update(state, grads, loss, optimizer)
  metrics = {"loss": loss, "cross_entropy": nll, "z_loss": z_term, "moe_aux_loss": sums["moe_aux_sum"],
             "accuracy": sums["correct_sum"] / weight, "learning_rate": schedule(state["step"]),
             "loss_tokens": sums["weight_sum"], **update}
  return new, metrics


def train_steps(state: dict, batches: tuple, *, step_fn):
  """len(batches) updates in one computation: `step_fn` scanned over the batches stacked; the
  metrics stacked along a new leading axis."""
  stacked = jax.tree.map(lambda *fields: jnp.stack(fields), *batches)
  return jax.lax.scan(step_fn, state, stacked)


# TrainerConfig.steps_per_call "auto": on a one-device CPU mesh, this many updates per call
# (llama-small on the project's 2-core machine: 1.085x the step speed of one call per step, the
# temporaries' page faults per step / 4, peak RSS +0.1 GiB; BENCHMARKS.md), for runs of at
# least AUTO_MIN_STEPS steps (a call cut short by a checkpoint or eval step compiles once more
# for its length; short runs, most tests among them, keep one call per step). TPU / GPU
# allocators keep their memory, and multi-device CPU meshes are emulations for tests: 1 there.
CPU_STEPS_PER_CALL = 4
AUTO_MIN_STEPS = 64


def resolve_steps_per_call(value, platform: str, device_count: int, num_steps: int) -> int:
  """The updates per call TrainerConfig.steps_per_call=`value` means: an int >= 1 as given;
  "auto": CPU_STEPS_PER_CALL for a run of >= AUTO_MIN_STEPS steps on a one-device CPU mesh,
  else 1."""
  if value == "auto":
    if platform == "cpu" and device_count == 1 and num_steps >= AUTO_MIN_STEPS:
      return CPU_STEPS_PER_CALL
    return 1
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"TrainerConfig.steps_per_call={value!r} must be 'auto' or an int >= 1")
  return value


def eval_sums(params, batch: dict, *, model_config: ModelConfig) -> dict:
  return token_sums_and_aux(params, batch, model_config)[0]


class TrainProgram:
  """A model + optimizer compiled for a mesh; see the module docstring."""

  def __init__(self, model_config: ModelConfig, optimizer_config: optim.OptimizerConfig,
               mesh_config: shd.MeshConfig, *, num_steps: int, global_batch_size: int,
               step_config: StepConfig = StepConfig(), devices: Optional[Sequence[jax.Device]] = None,
               tuning=None):
    self.model_config = model_config
    self.tuning = tuning  # glmjax.tuning.lora.LoraTuning: adapters on a frozen base, or None
    self.global_batch_size = global_batch_size
    self.mesh = shd.make_mesh(mesh_config, devices)
    step_config = dataclasses.replace(step_config, pipeline_repeats=shd.mesh.pipeline_repeats(mesh_config))
    if self.mesh.shape["stage"] > 1:  # before anything is built: the layers split into stages
      pipeline.check_layers(model_config, self.mesh.shape["stage"], step_config.pipeline_repeats)
    self.step_config = step_config
    self.rules = shd.normalise_rules(mesh_config.rules)
    self.optimizer, self.schedule = optim.make_optimizer(optimizer_config, num_steps)
    if tuning is not None:
      self.optimizer = tuning.wrap_optimizer(self.optimizer)
    self._check_batch(global_batch_size, step_config.microbatches)

    rep = shd.replicated(self.mesh)
    self.param_shardings = (shd.param_shardings(model_config, self.mesh, self.rules) if tuning is None
                            else tuning.param_shardings(self.mesh, self.rules))
    self.abstract_params = jax.eval_shape(self._init_params, jax.random.PRNGKey(0))
    opt_shardings = shd.opt_state_shardings(self.optimizer, self.abstract_params, self.param_shardings,
                                            self.mesh)
    if optimizer_config.state_sharding == "data":
      opt_shardings = optim.shard_state_over(
          opt_shardings, jax.eval_shape(self.optimizer.init, self.abstract_params), self.mesh)
    self.state_shardings = {"step": rep, "params": self.param_shardings, "opt_state": opt_shardings,
                            "rng": rep, "nonfinite_streak": rep, "nonfinite_total": rep}
    self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)

    self._init = jax.jit(self._init_state, static_argnums=(), out_shardings=self.state_shardings)
    step_fn = functools.partial(train_step, model_config=model_config, optimizer=self.optimizer,
                                schedule=self.schedule, step_config=step_config, tuning=tuning)
    self._step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self._steps = jax.jit(functools.partial(train_steps, step_fn=step_fn),
                          in_shardings=(self.state_shardings, self.batch_sharding),
                          out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self._eval = jax.jit(functools.partial(eval_sums, model_config=model_config),
                         in_shardings=(self.param_shardings, self.batch_sharding), out_shardings=rep)

  def _check_batch(self, batch_size: int, microbatches: int) -> None:
    parts = shd.batch_divisor(self.mesh, self.rules)
    if microbatches < 1:
      raise ValueError(f"TrainerConfig.microbatches={microbatches} must be >= 1")
    if batch_size % (parts * microbatches):
      raise ValueError(
          f"DataConfig.batch_size={batch_size} must be a multiple of microbatches ({microbatches}) x "
          f"the {parts} batch shards of the mesh {dict(self.mesh.shape)}; change the batch size, "
          "TrainerConfig.microbatches or MeshConfig")

  def _init_params(self, rng, base=None):
    if self.tuning is None:
      return init_params(self.model_config, rng)
    return self.tuning.init_params(rng, base)

  def _init_state(self, rng, base=None):
    params = self._init_params(rng, base)
    return new_state(params, self.optimizer.init(params), rng)

  def sharding_context(self):
    """Mesh + logical-axis rules active while jit traces (activation constraints bind to them)."""
    return shd.activation_sharding(self.mesh, self.rules)

  def init_state(self, seed: int) -> dict:
    base = None if self.tuning is None else self.tuning.load_base(self.mesh, self.rules)
    with self.sharding_context():
      return self._init(jax.random.PRNGKey(seed), base)

  def checkpoint_state(self, state: dict) -> dict:
    """What a checkpoint holds: the state, or with `tuning` the state without the frozen base."""
    return state if self.tuning is None else self.tuning.checkpoint_view(state)

  def checkpoint_target(self) -> dict:
    return self.checkpoint_state(self.abstract_state())

  def complete_state(self, restored: dict, seed: int) -> dict:
    """A restored checkpoint_state as a full state (with `tuning`: the base put back)."""
    return restored if self.tuning is None else self.tuning.complete(restored, self.init_state(seed))

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    shapes = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def abstract_batch(self, sequence_length: int) -> dict:
    """ShapeDtypeStructs of one global batch (every contract key) with the batch sharding."""
    shape = (self.global_batch_size, sequence_length)
    return {key: jax.ShapeDtypeStruct(shape, batch_dtype(key), sharding=self.batch_sharding)
            for key in BATCH_KEYS}

  def lower(self, step: str, sequence_length: int):
    """The jitted train or eval step lowered for abstract inputs (ahead-of-time compiles for
    devices that need not be attached, e.g. `jax.experimental.topologies`)."""
    batch = self.abstract_batch(sequence_length)
    state = self.abstract_state()  # outside the mesh context: it runs a PRNGKey on this host
    with self.sharding_context():
      if step == "train":
        return self._step.lower(state, batch)
      if step == "eval":
        return self._eval.lower(state["params"], batch)
    raise ValueError(f"step={step!r} is not 'train' or 'eval'")

  def global_batch(self, host_batch: dict) -> dict:
    """This process's rows -> global arrays sharded over the mesh's batch axes."""
    return shd.global_batch(host_batch, self.batch_sharding, self.global_batch_size)

  def _as_global(self, batch: dict) -> dict:
    """`batch` as global arrays: host numpy (a single process only) goes through global_batch."""
    if jax.process_count() == 1 and isinstance(next(iter(batch.values())), np.ndarray):
      return self.global_batch(batch)
    return batch

  def train_step(self, state: dict, batch: dict):
    """One update; `batch` is global arrays (see global_batch) or host numpy on a single process."""
    with self.sharding_context():
      return self._step(state, self._as_global(batch))

  def train_steps(self, state: dict, batches: Sequence[dict]):
    """len(batches) updates in one call (module docstring); metrics with a leading [n]. Each
    batch as for train_step; one compilation per number of batches."""
    with self.sharding_context():
      return self._steps(state, tuple(self._as_global(b) for b in batches))

  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  def eval_sums(self, params, batch: dict) -> dict:
    with self.sharding_context():
      return self._eval(params, self._as_global(batch))
