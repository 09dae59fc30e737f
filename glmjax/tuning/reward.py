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
