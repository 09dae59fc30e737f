"""The train step: gradient accumulation equals the big batch; non-finite updates are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.sharding import MeshConfig
from glmjax.trainer import (CheckpointConfig, DataConfig, Experiment, NonFiniteLossError, OptimizerConfig,
                            StepConfig, TrainerConfig, TrainProgram, train)
from glmjax.model import init_params
from glmjax.trainer.step import gradients
from tests.train.helpers import random_batches, tiny_model

BATCH, LENGTH = 16, 16
MESH = MeshConfig(data=2, fsdp=2, tensor=2)
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, schedule="constant")


def program(microbatches):
  return TrainProgram(tiny_model(), OPTIMIZER, MESH, num_steps=2, global_batch_size=BATCH,
                      step_config=StepConfig(microbatches=microbatches, z_loss=1e-4))


@pytest.fixture(scope="module")
def big_batch_run():
  prog = program(1)
  state = prog.init_state(0)
  metrics = []
  for batch in random_batches(2, BATCH, LENGTH, seed=5):
    state, m = prog.train_step(state, batch)
    metrics.append(jax.device_get(m))
  return prog, jax.device_get(state), metrics


def test_four_microbatches_equal_the_big_batch(big_batch_run):
  """Rows have different numbers of counted tokens, so per-microbatch means would differ;
  normalising by the whole batch's token count makes the sum of microbatch gradients exact."""
  _, want_state, want_metrics = big_batch_run
  prog = program(4)
  state = prog.init_state(0)
  for batch, want in zip(random_batches(2, BATCH, LENGTH, seed=5), want_metrics):
    state, got = prog.train_step(state, batch)
    got = jax.device_get(got)
    for key in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm", "loss_tokens"):
      np.testing.assert_allclose(got[key], want[key], rtol=2e-6, err_msg=key)
  # Adam divides by sqrt(v): near-zero gradients turn rounding noise into up to ~1e-3 of a
  # learning-rate step, hence atol = lr / 300 on the params (the gradients are compared tightly below).
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
  for (path, got), want in zip(flat, jax.tree.leaves(want_state["params"])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_accumulated_gradients_equal_the_big_batch_gradients():
  config = tiny_model()
  params = init_params(config, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in random_batches(1, BATCH, LENGTH, seed=6)[0].items()}
  grads = jax.jit(lambda p, b, m: gradients(p, b, config, StepConfig(microbatches=m, z_loss=1e-4)),
                  static_argnums=2)
  (want, want_sums), (got, got_sums) = grads(params, batch, 1), grads(params, batch, 4)
  for key in want_sums:
    np.testing.assert_allclose(got_sums[key], want_sums[key], rtol=1e-6, err_msg=key)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))


def test_microbatches_must_split_the_batch_shards():
  with pytest.raises(ValueError, match="batch_size=16 must be a multiple of microbatches \\(8\\) x the 4 batch"):
    program(8)


def poisoned(batch):
  bad = dict(batch)
  bad["loss_mask"] = np.where(batch["loss_mask"] > 0, np.inf, 0.0).astype(np.float32)
  return bad


def test_non_finite_update_is_skipped_and_counted(big_batch_run):
  prog = big_batch_run[0]
  good = random_batches(1, BATCH, LENGTH, seed=7)[0]
  state = prog.init_state(0)
  before = jax.device_get(state)
  state, m = prog.train_step(state, poisoned(good))
  after = jax.device_get(state)
  assert not bool(m["finite"]) and int(m["nonfinite_streak"]) == 1
  assert int(after["nonfinite_total"]) == 1 and int(after["step"]) == 1
  for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                  jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"])):
    np.testing.assert_array_equal(a, b)
  state, m = prog.train_step(state, good)
  assert bool(m["finite"]) and int(m["nonfinite_streak"]) == 0
  assert int(jax.device_get(state["nonfinite_total"])) == 1


def test_training_stops_after_too_many_non_finite_steps_in_a_row():
  batches = [poisoned(b) for b in random_batches(3, BATCH, LENGTH, seed=8)]
  experiment = Experiment(model=tiny_model(), mesh=MESH, optimizer=OPTIMIZER,
                          data=DataConfig(sequence_length=LENGTH, batch_size=BATCH),
                          trainer=TrainerConfig(num_steps=3, max_nonfinite_streak=2, progress_bar=False,
                                                eval_at_end=False, plot=False, peak_flops_per_device=1e9,
                                                z_loss=1e-4),
                          checkpoint=CheckpointConfig(save_every=0))
  with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row"):
    train(experiment, train_data=lambda: batches)


def test_token_ids_outside_the_vocabulary_fail_clearly():
  batches = random_batches(1, BATCH, LENGTH, seed=9, vocab=100)  # the model has 64 ids
  experiment = Experiment(model=tiny_model(), mesh=MESH, optimizer=OPTIMIZER,
                          data=DataConfig(sequence_length=LENGTH, batch_size=BATCH),
                          trainer=TrainerConfig(num_steps=1, progress_bar=False, eval_at_end=False, plot=False,
                                                peak_flops_per_device=1e9),
                          checkpoint=CheckpointConfig(save_every=0))
  with pytest.raises(ValueError, match=r"batch\['tokens'\] has ids in \[0, 99\], outside \[0, 64\) \(ModelConfig.vocab_size=64\)"):
    train(experiment, train_data=lambda: batches)


def test_moe_auxiliary_loss_is_added():
  """loss = cross-entropy + router_aux_loss_weight * (Switch load-balancing loss)."""
  config = tiny_model(num_experts=4, experts_top_k=2, router_aux_loss_weight=0.5, num_kv_heads=2)
  prog = TrainProgram(config, OPTIMIZER, MeshConfig(data=-1, expert=2), num_steps=1, global_batch_size=8)
  _, m = prog.train_step(prog.init_state(0), random_batches(1, 8, LENGTH, seed=10)[0])
  m = jax.device_get(m)
  assert 0.5 < float(m["moe_aux_loss"]) < 4.0  # E * sum f_e P_e is 1 when perfectly balanced
  np.testing.assert_allclose(m["loss"], m["cross_entropy"] + 0.5 * m["moe_aux_loss"], rtol=1e-6)
