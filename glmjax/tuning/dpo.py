"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) and its IPO /
label-smoothed variants, on glmjax's sharded train state.

With s(y) = log pi_theta(y | x) - log pi_ref(y | x) summed over the response tokens,

  DPO (eq. 7):        L = -log sigmoid(beta (s(y_w) - s(y_l)))
  cDPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's label_smoothing = eps):
                      L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h),  h = beta (s(y_w) - s(y_l))
  IPO (Azar et al. 2023, eq. 17, tau = beta):
                      L = (s(y_w) / n_w - s(y_l) / n_l - 1 / (2 beta))^2
                      with the log ratios averaged over the n response tokens, as TRL does (its
                      comment: confirmed with the IPO authors, the paper's results use this form).

Implicit rewards r = beta s(y) (sec. 5); metrics: rewards of chosen / rejected, their margin and
preference accuracy (share of pairs with r_chosen > r_rejected). At policy = reference every s is
0 and L = log 2.

Batch layout: a pair is two adjacent rows, chosen at row 2i and rejected at 2i + 1 (one
sequence per row, `loss_mask` on the response tokens), so a pair never straddles batches, and
never devices for an even number of rows per batch shard. The reference log-probs come from
the frozen base inside the step: the LoRA params with the adapters left out (what TRL does for
a PEFT model: adapters disabled), or from `batch["reference_logps"]` [rows], precomputed once
(`reference_logps`), for a full fine-tune.

TRL 1.16 has no standalone `dpo_loss` any more (the formulas live inside
`DPOTrainer._compute_loss`, which needs a model); the tests check these against the formulas above
in NumPy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from glmjax.model import ModelConfig, forward
from glmjax.model.batch import BATCH_KEYS
from glmjax.tuning import lora as lora_lib

LOSS_TYPES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  beta: float = 0.1
  loss_type: str = "sigmoid"  # "sigmoid" (DPO, cDPO with label_smoothing) | "ipo"
  label_smoothing: float = 0.0  # cDPO's eps: the probability a preference label is flipped
  task: str = ""  # glmjax train: a preference task (glmjax.tasks.preference); "": no DPO
  style: str = "instruction"  # "instruction" | "chatglm3" (glmjax.tasks.preference.STYLES)


def validate(config: DpoConfig) -> None:
  if not config.beta > 0:
    raise ValueError(f"DpoConfig.beta={config.beta!r} must be > 0")
  if config.loss_type not in LOSS_TYPES:
    raise ValueError(f"DpoConfig.loss_type={config.loss_type!r} is not one of {LOSS_TYPES}")
  if not 0.0 <= config.label_smoothing < 0.5:
    raise ValueError(f"DpoConfig.label_smoothing={config.label_smoothing!r} must be in [0, 0.5)")
  if config.loss_type == "ipo" and config.label_smoothing:
    raise ValueError("DpoConfig.label_smoothing applies to loss_type='sigmoid' only")


def sequence_logps(logits, targets, loss_mask):
  """(sum over masked positions of log p(target) [rows], number of those positions [rows])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token * mask, axis=-1), jnp.sum(mask, axis=-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, config: DpoConfig,
             chosen_tokens=None, rejected_tokens=None):
  """(per-pair losses [P], metrics) from per-sequence log-probs [P] (see the module docstring)."""
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  if config.loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("DpoConfig.loss_type='ipo' needs the response token counts")
    delta = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)
             - rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
    losses = jnp.square(delta - 1.0 / (2.0 * config.beta))
  else:
    h = config.beta * (chosen_ratio - rejected_ratio)
    eps = config.label_smoothing
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
  chosen_reward = config.beta * chosen_ratio
  rejected_reward = config.beta * rejected_ratio
  metrics = {"loss": jnp.mean(losses), "rewards_chosen": jnp.mean(chosen_reward),
             "rewards_rejected": jnp.mean(rejected_reward),
             "rewards_margin": jnp.mean(chosen_reward - rejected_reward),
             "preference_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32))}
  return losses, metrics


def reference_params(params: dict) -> dict:
  """The frozen base of LoRA params (adapters left out): the DPO reference policy."""
  return jax.tree.map(lambda x: x.base if lora_lib.is_lora(x) else x, params, is_leaf=lora_lib.is_lora)


def _model_batch(batch: dict) -> dict:
  return {k: batch[k] for k in BATCH_KEYS if k in batch}


def _has_adapters(params) -> bool:
  return any(lora_lib.is_lora(x) for x in jax.tree.leaves(params, is_leaf=lora_lib.is_lora))


def reference_logps(params: dict, batch: dict, model_config: ModelConfig):
  """Per-row response log-probs [rows] under `params` (the reference, computed once)."""
  logits = forward(params, _model_batch(batch), model_config)
  return sequence_logps(logits, batch["targets"], batch["loss_mask"])[0]


def dpo_objective(params: dict, batch: dict, model_config: ModelConfig, config: DpoConfig,
                  policy_forward=forward):
  """(mean pair loss, metrics) of one batch of adjacent (chosen, rejected) rows. `policy_forward`
  runs the policy (the train step passes LoRA dropout's, lora.LoraTuning.train_forward); the
  reference always runs the plain forward."""
  model_batch = _model_batch(batch)
  logps, counts = sequence_logps(policy_forward(params, model_batch, model_config), batch["targets"],
                                 batch["loss_mask"])
  if "reference_logps" in batch:
    ref = batch["reference_logps"].astype(jnp.float32)
  elif _has_adapters(params):
    ref_logits = forward(jax.lax.stop_gradient(reference_params(params)), model_batch, model_config)
    ref = sequence_logps(ref_logits, batch["targets"], batch["loss_mask"])[0]
  else:
    raise ValueError("DPO needs a reference: LoRA params (the frozen base is the reference) or "
                     "batch['reference_logps'] (see dpo.reference_logps)")
  losses, metrics = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], config,
                             counts[0::2], counts[1::2])
  return jnp.mean(losses), metrics


def dpo_train_step(state: dict, batch: dict, *, model_config: ModelConfig, optimizer, config: DpoConfig,
                   tuning=None):
  """One DPO update of a TrainProgram state; a non-finite loss or gradient skips it (as train_step).
  With LoRA dropout the policy's masks come from fold_in(state rng, state step)."""
  policy_forward = forward
  if tuning is not None and hasattr(tuning, "train_forward"):
    policy_forward = tuning.train_forward(jax.random.fold_in(state["rng"], state["step"]), forward)
  (loss, metrics), grads = jax.value_and_grad(dpo_objective, has_aux=True)(
      state["params"], batch, model_config, config, policy_forward)
  from glmjax.trainer.step import guarded_update  # pylint: disable=import-outside-toplevel  (loop imports this module)
  new, update = guarded_update(state, grads, loss, optimizer)
  return new, {**metrics, **update}


class DpoProgram:
  """DPO steps on a TrainProgram's mesh, state shardings and (frozen-base) optimizer.

      program = TrainProgram(model, optimizer, mesh, ..., tuning=LoraTuning(model, lora))
      dpo = DpoProgram(program, DpoConfig(beta=0.1))
      state, metrics = dpo.train_step(state, pair_batch)
  """

  def __init__(self, program, config: DpoConfig = DpoConfig()):
    validate(config)
    if program.global_batch_size % 2:
      raise ValueError(f"DataConfig.batch_size={program.global_batch_size} must be even: "
                       "DPO rows come in (chosen, rejected) pairs")
    self.program = program
    self.config = config
    rep = jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec())
    step = functools.partial(dpo_train_step, model_config=program.model_config,
                             optimizer=program.optimizer, config=config, tuning=program.tuning)
    self._step = jax.jit(step, in_shardings=(program.state_shardings, None),
                         out_shardings=(program.state_shardings, rep), donate_argnums=(0,))
    self._metrics = jax.jit(
        lambda params, batch: dpo_objective(params, batch, program.model_config, config)[1],
        out_shardings=rep)

  def _place(self, batch: dict) -> dict:
    model_keys = {k: v for k, v in batch.items() if k in BATCH_KEYS}
    if all(isinstance(v, jax.Array) for v in model_keys.values()):  # already global (the train loop)
      return dict(batch)
    placed = self.program.global_batch(model_keys)
    if "reference_logps" in batch:
      placed["reference_logps"] = jnp.asarray(batch["reference_logps"], jnp.float32)
    return placed

  def train_step(self, state: dict, batch: dict):
    with self.program.sharding_context():
      return self._step(state, self._place(batch))

  def metrics(self, params: dict, batch: dict) -> dict:
    """DPO metrics (loss, rewards, margin, preference accuracy) of `params` on a batch of pairs."""
    with self.program.sharding_context():
      return self._metrics(params, self._place(batch))


def train_hooks(program, experiment):
  """What `glmjax train` swaps in when DpoConfig.task is set: (the DPO step, a zero-argument
  callable giving the endless stream of pair batches of DataConfig.batch_size rows)."""
  import itertools  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import preference  # pylint: disable=import-outside-toplevel
  config, data = experiment.dpo, experiment.data
  if config.style not in preference.STYLES:
    raise ValueError(f"DpoConfig.style={config.style!r} is not one of {preference.STYLES}")
  preference.register_toy_task()
  dpo = DpoProgram(program, config)

  def pairs():
    for _ in itertools.count():  # epochs in the task's order: deterministic, so resume replays it
      yield from preference.pair_batches(config.task, "train", pairs=data.batch_size // 2,
                                         sequence_length=data.sequence_length, style=config.style)
  return dpo.train_step, pairs
