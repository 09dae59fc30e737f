"""Reward model (InstructGPT, Ouyang et al. 2022, sec. 3.5): the decoder's final hidden state at the
last token of each response through a scalar head, trained with the Bradley-Terry pairwise loss

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))       (InstructGPT eq. 1, K = 2)

Params: {"model": decoder params (plain, or LoRA params with a frozen base), "head": {"kernel"
[D], "bias" []}}. Batches are preference pairs as glmjax.tasks.preference lays them out (chosen at
row 2i, rejected at 2i + 1); the response's last token is the input at the last `loss_mask`
position (the one that predicts the end token).
"""

from __future__ import annotations

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
  return loss, {"loss": loss, "pairwise_accuracy": accuracy, "reward_margin": jnp.mean(r[0::2] - r[1::2])}


def _label(path) -> str:
  head = bool(path) and getattr(path[0], "key", None) == "head"
  return "train" if head or lora_lib.is_adapter_path(path) else "frozen"


def optimizer_for(optimizer: optax.GradientTransformation, train_base: bool) -> optax.GradientTransformation:
  """`optimizer` on everything (train_base) or on the head and LoRA adapters only."""
  if train_base:
    return optimizer
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _label(p), params)  # noqa: E731
  return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


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
