"""A tiny model trained with attention_impl="pallas" (interpret mode) matches "xla" step for step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import model
from glmjax.pallas import flash, flash_triton
from tests.pallas import cases

STEPS = 3
LEARNING_RATE = 0.5


def _glm_batch(rng, config, batch_size, length):
  """Packed GLM rows: Part A bidirectional, Part B causal with the loss, trailing padding."""
  segment_ids, bidirectional = cases.packed_batch(rng, batch_size, length, "glm")
  positions = np.zeros_like(segment_ids)
  for row in range(batch_size):
    for segment in np.unique(segment_ids[row][segment_ids[row] > 0]):
      where = np.flatnonzero(segment_ids[row] == segment)
      positions[row, where] = np.arange(where.size)
  tokens = rng.integers(0, config.vocab_size, size=(batch_size, length), dtype=np.int32)
  targets = rng.integers(0, config.vocab_size, size=(batch_size, length), dtype=np.int32)
  loss_mask = ((segment_ids > 0) & (bidirectional == 0)).astype(np.float32)
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
          "positions": positions, "block_positions": np.zeros_like(segment_ids),
          "bidirectional": bidirectional}


def _masked_cross_entropy(params, batch, config):
  logits = model.forward(params, batch, config)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
  return -jnp.sum(target_log_probs * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def _train(config, params, batch):
  @jax.jit
  def step(params):
    loss, grads = jax.value_and_grad(_masked_cross_entropy)(params, batch, config)
    return loss, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

  losses = []
  for _ in range(STEPS):
    loss, params = step(params)
    losses.append(float(loss))
  return losses, params


@pytest.mark.parametrize("preset", ["tiny-glm", "tiny-bloom", "tiny-chatglm2"])
def test_training_losses_match_xla(preset, monkeypatch):
  # Small blocks so the 64-token rows span several query and key blocks.
  assert flash.CPU_VARIANT == "triton"
  monkeypatch.setattr(flash_triton, "DEFAULT_BLOCK_Q", 16)
  monkeypatch.setattr(flash_triton, "DEFAULT_BLOCK_K", 32)
  config = model.presets.get(preset)
  rng = np.random.default_rng(0)
  batch = _glm_batch(rng, config, 2, config.max_length)
  params = model.init_params(config, jax.random.key(0))
  xla_losses, xla_params = _train(dataclasses.replace(config, attention_impl="xla"), params, batch)
  pallas_losses, pallas_params = _train(dataclasses.replace(config, attention_impl="pallas"), params,
                                        batch)
  assert xla_losses[-1] < xla_losses[0]
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(pallas_params), jax.tree.leaves(xla_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
