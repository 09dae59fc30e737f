"""Reward model (InstructGPT, Ouyang et al. 2022, sec. 3.5): the decoder's final hidden state at the
last token of each response through a scalar head, trained with the Bradley-Terry pairwise loss

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))       (InstructGPT eq. 1, K = 2)

Params: {"model": decoder params (plain, or LoRA params with a frozen base), "head": {"kernel"
[D], "bias" []}}. Batches are preference pairs as glmjax.tasks.preference lays them out (chosen at
row 2i, rejected at 2i + 1); the response's last token is the input at the last `loss_mask`
position (the one that predicts the end token).

Through `glmjax train` (RewardConfig.task set in gin, experiments/reward_*.gin): `RewardTuning` is
the TrainProgram `tuning=` (params {"model", "head"}; the whole model trained, or with
LoraConfig.rank > 0 LoRA adapters on a frozen base; the head always), `train_hooks` swaps in the
Bradley-Terry step and the stream of pair batches, as glmjax.tuning.dpo does for DPO. Checkpoints
hold the state ({"model", "head"} params and optimizer state; with LoRA the adapters and the head,
not the base, which LoraConfig.base_checkpoint names). `glmjax eval --checkpoint <reward run>`
reports `pairwise_accuracy` on the preference task's held-out split (`eval_record`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from glmjax.model import ModelConfig, layers, transformer
from glmjax.model.batch import BATCH_KEYS
from glmjax.tuning import lora as lora_lib


def init_head(config: ModelConfig, rng: jax.Array) -> dict:
  """Scalar head, kernel ~ N(0, 1/D) (so initial rewards are O(1)), bias 0."""
  kernel = jax.random.normal(rng, (config.d_model,), jnp.float32) / jnp.sqrt(config.d_model)
  return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def hidden_states(params: dict, batch: dict, config: ModelConfig):
  """Final-norm hidden states [B, L, D] (the forward pass up to the vocabulary projection)."""
  batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
  transformer.validate_batch(batch, config)
  batch = transformer.default_fields(batch)
  ctx = transformer.position_context(batch, config)
  x = transformer.embed(params, batch, config)
  x, _ = transformer.run_layers(params["layers"], x, ctx, config)
  if config.has_final_norm:
    x = layers.apply_norm(config.norm, params["final_norm"], x, config.norm_eps)
  return x


def last_response_index(loss_mask):
  """[B] index of the last position with loss_mask > 0 (0 for a row without any)."""
  length = loss_mask.shape[-1]
  positions = jnp.arange(length, dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(loss_mask > 0, positions, 0), axis=-1)


def rewards(params: dict, batch: dict, config: ModelConfig):
  """Scalar reward per row [B]."""
  h = hidden_states(params["model"], batch, config).astype(jnp.float32)
  last = last_response_index(batch["loss_mask"])
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
  return h_last @ params["head"]["kernel"] + params["head"]["bias"]


def pairwise_loss(chosen, rejected):
  """(mean Bradley-Terry loss, pairwise accuracy) of rewards [P]."""
  loss = -jnp.mean(jax.nn.log_sigmoid(chosen - rejected))
  return loss, jnp.mean((chosen > rejected).astype(jnp.float32))


def objective(params: dict, batch: dict, config: ModelConfig):
  r = rewards(params, batch, config)
  loss, accuracy = pairwise_loss(r[0::2], r[1::2])
  return loss, {"loss": loss, "pairwise_accuracy": accuracy, "reward_margin": jnp.mean(r[0::2] - r[1::2]),
                "rewards_chosen": jnp.mean(r[0::2]), "rewards_rejected": jnp.mean(r[1::2])}


def optimizer_for(optimizer: optax.GradientTransformation, train_base: bool) -> optax.GradientTransformation:
  """`optimizer` on everything (train_base) or on the head and LoRA adapters only (see
  wrap_optimizer, what `glmjax train` uses)."""
  return wrap_optimizer(optimizer, train_base)


def train_step(params: dict, opt_state, batch: dict, *, config: ModelConfig, optimizer):
  """One update: (params, opt_state, metrics). jit it with config / optimizer bound."""
  (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, config)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics


# --- Pairwise accuracy over a preference task (what `glmjax eval` reports for a reward model) ---

def pairwise_accuracy(params: dict, config: ModelConfig, task_name: str, split: str = "validation", *,
                      sequence_length: int, pairs_per_batch: int = 8, style: str = "instruction",
                      max_pairs: int = 0) -> dict:
  """Share of the task's pairs whose chosen response out-scores the rejected one, r(chosen) >
  r(rejected) strictly (a tie counts as wrong, as `pairwise_loss`), over every pair of `split`
  (the first `max_pairs` when > 0). Pairs come from glmjax.tasks.preference.pair_batches in the
  task's order; the last batch is padded with copies of a pair that are not counted, so one
  compile serves every batch. Returns {pairwise_accuracy, pairs, ties, mean_margin, bt_loss,
  dropped (prompt too long for sequence_length), truncated}."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from glmjax.model import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import preference  # pylint: disable=import-outside-toplevel
  if pairs_per_batch < 1:
    raise ValueError(f"pairs_per_batch={pairs_per_batch} must be >= 1")
  stats = preference.PairStats()
  score = jax.jit(lambda p, b: rewards(p, b, config))
  chosen, rejected = [], []
  pending = []

  def flush():
    real = len(pending)
    rows = pending + [pending[0]] * (pairs_per_batch - real)
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    batch_lib.check_ids(batch, config)  # ids past the model's vocabulary / positions: one line
    r = np.asarray(score(params, batch), np.float64)
    chosen.extend(r[0:2 * real:2])
    rejected.extend(r[1:2 * real:2])
    pending.clear()

  for one in preference.pair_batches(task_name, split, pairs=1, sequence_length=sequence_length,
                                     style=style, stats=stats):
    if max_pairs and len(chosen) + len(pending) >= max_pairs:
      break
    pending.append(one)
    if len(pending) == pairs_per_batch:
      flush()
  if pending:
    flush()
  if not chosen:
    raise ValueError(f"preference task {task_name!r} split {split!r} gave no pairs at sequence_length="
                     f"{sequence_length} ({stats.dropped} prompts too long); raise the sequence length")
  c, r = np.asarray(chosen), np.asarray(rejected)
  margin = c - r
  return {"pairwise_accuracy": float(np.mean(margin > 0)), "pairs": int(len(c)),
          "ties": int(np.sum(margin == 0)), "mean_margin": float(np.mean(margin)),
          "bt_loss": float(np.mean(np.logaddexp(0.0, -margin))), "dropped": stats.dropped,
          "truncated": stats.truncated}


def eval_record(params: dict, config: ModelConfig, task_name: str, split: str = "validation",
                **options) -> dict:
  """One `glmjax eval` metrics record for a reward model: {"kind": "reward", "task", "split",
  **pairwise_accuracy(...)} (options: sequence_length, pairs_per_batch, style, max_pairs)."""
  return {"kind": "reward", "task": task_name, "split": split,
          **pairwise_accuracy(params, config, task_name, split, **options)}


# --- Through `glmjax train`: RewardConfig, RewardTuning, the step and the data -------------------

@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """task "": no reward model (the run is whatever else the experiment says)."""
  task: str = ""  # a preference task (glmjax.tasks.preference), e.g. glmjax_preference_shakespeare
  style: str = "instruction"  # "instruction" | "chatglm3" (glmjax.tasks.preference.STYLES)
  base_checkpoint: str = ""  # full fine-tune: run directory whose params start the model ("": the
  #                            seed's init); with LoRA the base is LoraConfig.base_checkpoint
  base_step: int = -1  # step of base_checkpoint; -1: its newest
  eval_split: str = "validation"  # the held-out pairs `glmjax eval` scores by default


def validate(config: RewardConfig, lora=None) -> None:
  from glmjax.tasks import preference  # pylint: disable=import-outside-toplevel
  if config.style not in preference.STYLES:
    raise ValueError(f"RewardConfig.style={config.style!r} is not one of {preference.STYLES}")
  if not isinstance(config.base_step, int):
    raise ValueError(f"RewardConfig.base_step={config.base_step!r} must be an int")
  if lora is not None and lora.enabled and config.base_checkpoint:
    raise ValueError("RewardConfig.base_checkpoint is for a full fine-tune; with LoraConfig.rank > 0 "
                     "name the base in LoraConfig.base_checkpoint")


HEAD_KEY = "reward_head"  # the head's key in the one-level tree the wrapped optimizer sees


def _flat(tree: dict) -> dict:
  return {**tree["model"], HEAD_KEY: tree["head"]}


def _nested(tree: dict) -> dict:
  return {"model": {k: v for k, v in tree.items() if k != HEAD_KEY}, "head": tree[HEAD_KEY]}


def _map_param_trees(fn, tree, is_param_tree):
  return jax.tree.map(lambda x: fn(x) if is_param_tree(x) else x, tree, is_leaf=is_param_tree)


def _is_flat(x) -> bool:
  return isinstance(x, dict) and HEAD_KEY in x


def _is_nested(x) -> bool:
  return isinstance(x, dict) and set(x) == {"model", "head"}


def _flat_label(path) -> str:
  head = bool(path) and getattr(path[0], "key", None) == HEAD_KEY
  return "train" if head or lora_lib.is_adapter_path(path) else "frozen"


def wrap_optimizer(optimizer: optax.GradientTransformation, train_base: bool) -> optax.GradientTransformation:
  """`optimizer` (built by glmjax.trainer.optim for a model's params) on {"model", "head"} params:
  it sees the model's own tree with the head as one more top-level entry (HEAD_KEY), so its
  per-name rules (no weight decay on norms, biases, embeddings) read the model's names; its state
  is kept nested like the params, so the optimizer-state shardings follow the params'. With
  train_base False only the head and the LoRA adapters are updated (zero updates, no state, for
  the rest)."""
  if not train_base:
    labels = lambda flat: jax.tree_util.tree_map_with_path(lambda p, _: _flat_label(p), flat)  # noqa: E731
    optimizer = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)

  def init(params):
    if HEAD_KEY in params["model"]:
      raise ValueError(f"model params have a top-level {HEAD_KEY!r} entry; it is the reward head's name")
    return _map_param_trees(_nested, optimizer.init(_flat(params)), _is_flat)

  def update(updates, state, params=None):
    flat_state = _map_param_trees(_flat, state, _is_nested)
    new_updates, new_state = optimizer.update(_flat(updates), flat_state,
                                              None if params is None else _flat(params))
    return _nested(new_updates), _map_param_trees(_nested, new_state, _is_flat)

  return optax.GradientTransformation(init, update)


class RewardTuning:
  """What TrainProgram asks of a tuning method (see lora.LoraTuning), for a reward model: params
  {"model": the decoder (plain, or LoRA params when `lora` is a LoraTuning), "head"}."""

  def __init__(self, model_config: ModelConfig, config: RewardConfig, lora: Optional[lora_lib.LoraTuning] = None):
    validate(config, None if lora is None else lora.lora)
    self.model_config = model_config
    self.config = config
    self.lora = lora

  def init_params(self, rng: jax.Array, base: Optional[dict] = None) -> dict:
    from glmjax.model import init_params  # pylint: disable=import-outside-toplevel
    if self.lora is not None:
      model = self.lora.init_params(rng, base)
    else:
      model = init_params(self.model_config, rng) if base is None else base
    return {"model": model, "head": init_head(self.model_config, jax.random.fold_in(rng, 0x4EAD))}

  def param_shardings(self, mesh, rules) -> dict:
    from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
    model = (shd.param_shardings(self.model_config, mesh, rules) if self.lora is None
             else self.lora.param_shardings(mesh, rules))
    rep = shd.replicated(mesh)
    return {"model": model, "head": {"kernel": rep, "bias": rep}}

  def wrap_optimizer(self, optimizer):
    return wrap_optimizer(optimizer, train_base=self.lora is None)

  def load_base(self, mesh, rules) -> Optional[dict]:
    if self.lora is not None:
      return self.lora.load_base(mesh, rules)
    return lora_lib.load_base(self.model_config, self.config.base_checkpoint, self.config.base_step, mesh,
                              rules, "RewardConfig")

  def checkpoint_view(self, state: dict) -> dict:
    if self.lora is None:
      return state
    params = state["params"]
    return {**state, "params": {"model": lora_lib.adapters_only(params["model"]), "head": params["head"]}}

  def complete(self, restored: dict, fresh: dict) -> dict:
    if self.lora is None:
      return restored
    params = restored["params"]
    return {**restored, "params": {"model": lora_lib.with_base(params["model"], fresh["params"]["model"]),
                                   "head": params["head"]}}


def tuning_for(model_config: ModelConfig, config: RewardConfig, lora=None) -> Optional[RewardTuning]:
  """RewardTuning when `config.task` is set (around `lora`, a LoraTuning or None), else None."""
  if not config.task:
    return None
  return RewardTuning(model_config, config, lora)


def reward_train_step(state: dict, batch: dict, *, model_config: ModelConfig, optimizer, schedule,
                      dropout: float = 0.0):
  """One Bradley-Terry update of a TrainProgram state of {"model", "head"} params; a non-finite
  loss or gradient skips it (as the LM step). LoRA dropout (rate `dropout`): the adapters' masks
  come from fold_in(state rng, state step), as in the LM step."""
  from glmjax.trainer.step import float_grad, guarded_update  # pylint: disable=import-outside-toplevel  (loop imports this module)
  key = jax.random.fold_in(state["rng"], state["step"])

  def loss(params, batch, config):
    if dropout:
      params = {**params, "model": lora_lib.dropout_view(params["model"], key, dropout)}
    value, metrics = objective(params, batch, config)
    return value, metrics

  grads, metrics = float_grad(loss)(state["params"], batch, model_config)  # QLoRA: integer base leaves
  new, update = guarded_update(state, grads, metrics["loss"], optimizer)
  return new, {**metrics, "learning_rate": schedule(state["step"]), **update}


class RewardProgram:
  """Reward-model steps on a TrainProgram whose `tuning` is a RewardTuning (its mesh, state
  shardings and wrapped optimizer)."""

  def __init__(self, program):
    if not isinstance(program.tuning, RewardTuning):
      raise ValueError("RewardProgram needs a TrainProgram built with tuning=RewardTuning(...)")
    if program.global_batch_size % 2:
      raise ValueError(f"DataConfig.batch_size={program.global_batch_size} must be even: reward-model "
                       "rows come in (chosen, rejected) pairs")
    if program.step_config.microbatches != 1:
      raise ValueError("TrainerConfig.microbatches > 1 is not supported for a reward model (a pair's "
                       "rows would land in different microbatches); set it to 1")
    self.program = program
    lora = program.tuning.lora
    rate = float(lora.lora.dropout) if lora is not None else 0.0
    rep = jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec())
    step = functools.partial(reward_train_step, model_config=program.model_config,
                             optimizer=program.optimizer, schedule=program.schedule, dropout=rate)
    self._step = jax.jit(step, in_shardings=(program.state_shardings, None),
                         out_shardings=(program.state_shardings, rep), donate_argnums=(0,))

  def train_step(self, state: dict, batch: dict):
    with self.program.sharding_context():
      if not all(isinstance(v, jax.Array) for v in batch.values()):
        batch = self.program.global_batch(batch)
      return self._step(state, batch)


def train_hooks(program, experiment):
  """What `glmjax train` swaps in when RewardConfig.task is set: (the reward-model step, a
  zero-argument callable giving the endless stream of pair batches of DataConfig.batch_size rows,
  the task's train split in its order, epoch after epoch: deterministic, so resume replays it)."""
  from glmjax.tasks import preference  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel
  config, data = experiment.reward, experiment.data
  preference.register_toy_task()
  if config.task not in seqio.TaskRegistry.names():
    raise ValueError(f"RewardConfig.task={config.task!r} is not a registered seqio task; register a "
                     "preference task (glmjax.tasks.preference.register_preference_task) in a --module")
  reward_program = RewardProgram(program)

  def pairs():
    for _ in itertools.count():
      yield from preference.pair_batches(config.task, "train", pairs=data.batch_size // 2,
                                         sequence_length=data.sequence_length, style=config.style)
  return reward_program.train_step, pairs


# --- A reward run's params for `glmjax eval` ---------------------------------------------------

def is_reward_run(path: str, step: Optional[int] = None) -> bool:
  """Whether run directory `path` (its newest readable step, or `step`) trained a reward model."""
  from glmjax.run.directory import UnreadableCheckpoint, Workdir  # pylint: disable=import-outside-toplevel
  from glmjax.run.load import run_experiment  # pylint: disable=import-outside-toplevel
  try:
    workdir = Workdir(path)
    for candidate in workdir.select_step(step):
      try:
        return bool(run_experiment(workdir, candidate).reward.task)
      except UnreadableCheckpoint:
        continue
  except (ValueError, OSError):
    return False  # not a run (the ordinary load says why)
  return False


def restore_reward_params(checkpoints_dir: str, step: int, experiment, mesh, rules) -> dict:
  """A reward run's {"model", "head"} params on `mesh`: the checkpoint's (full fine-tune), or with
  LoRA its base (LoraConfig.base_checkpoint, or the seed's init as in training) with the
  checkpoint's adapters and head."""
  from glmjax.run.load import restore_params  # pylint: disable=import-outside-toplevel
  lora = lora_lib.tuning_for(experiment.model, experiment.lora)
  tuning = RewardTuning(experiment.model, experiment.reward, lora)
  shardings = tuning.param_shardings(mesh, rules)
  if lora is None:
    shapes = jax.eval_shape(tuning.init_params, jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    return restore_params(checkpoints_dir, step, abstract)
  full = jax.jit(tuning.init_params, out_shardings=shardings)(jax.random.PRNGKey(experiment.trainer.seed),
                                                               tuning.load_base(mesh, rules))
  view = tuning.checkpoint_view({"params": full})["params"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), view)
  return tuning.complete({"params": restore_params(checkpoints_dir, step, abstract)}, {"params": full})["params"]


def load_reward_run(path: str, step: Optional[int] = None, *, devices=None, log=None):
  """glmjax.run.load.load_params for a reward run: a LoadedParams whose params are {"model",
  "head"} (newest readable step unless `step`; unreadable newer steps skipped with a `log` line)."""
  from glmjax.run import load as load_lib  # pylint: disable=import-outside-toplevel
  loaded = load_lib.load_params(path, step, devices=devices, log=log)
  if not loaded.experiment.reward.task:
    raise ValueError(f"{loaded.workdir.path} step {loaded.step} is not a reward-model run "
                     "(RewardConfig.task unset)")
  return loaded
