"""A few sharded training steps equal the single-device ones (float32, tight tolerance)."""

import jax
import numpy as np
import pytest

from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, StepConfig, TrainProgram
from tests.train.helpers import random_batches, tiny_model

STEPS, BATCH, LENGTH = 3, 8, 16
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, schedule="constant", weight_decay=0.1, grad_clip_norm=1.0)


def run(mesh_config, devices=None, attention_impl="xla"):
  program = TrainProgram(tiny_model(attention_impl=attention_impl), OPTIMIZER, mesh_config, num_steps=STEPS, global_batch_size=BATCH,
                         step_config=StepConfig(z_loss=1e-4), devices=devices)
  state = program.init_state(seed=0)
  losses = []
  for batch in random_batches(STEPS, BATCH, LENGTH, seed=1):
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return program, losses, state


@pytest.fixture(scope="module")
def single_device():
  program, losses, state = run(MeshConfig(data=1), devices=jax.devices()[:1])
  params = jax.device_get(state["params"])
  initial = jax.device_get(program.init_state(seed=0)["params"])
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial)))
  assert moved > 1e-3  # the steps did update the params
  return losses, params


@pytest.mark.parametrize("mesh_config, wq_spec, attention_impl", [
    (MeshConfig(data=8), (None, None, None, None), "xla"),
    (MeshConfig(data=1, fsdp=8), (None, "fsdp", None, None), "xla"),
    (MeshConfig(data=2, fsdp=2, tensor=2), (None, "fsdp", "tensor", None), "xla"),
    (MeshConfig(data=2, fsdp=2, tensor=2), (None, "fsdp", "tensor", None), "dense"),
], ids=["data8", "fsdp8", "data2_fsdp2_tensor2", "data2_fsdp2_tensor2_dense_attention"])
def test_sharded_steps_match_one_device(single_device, mesh_config, wq_spec, attention_impl):
  ref_losses, ref_params = single_device
  program, losses, state = run(mesh_config, attention_impl=attention_impl)
  wq = state["params"]["layers"]["attn"]["wq"]
  assert tuple(wq.sharding.spec) == wq_spec
  assert len(wq.sharding.device_set) == 8
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
  for (path, got), want in zip(flat, jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_activation_constraints_reach_the_compiled_step():
  """The model's logical constraints bind to the mesh (jax.set_mesh + flax rules)."""
  program = TrainProgram(tiny_model(), OPTIMIZER, MeshConfig(data=2, fsdp=2, tensor=2), num_steps=STEPS,
                         global_batch_size=BATCH)
  batch = program.global_batch(random_batches(1, BATCH, LENGTH)[0])
  with program.sharding_context():
    text = program._step.lower(program.abstract_state(), batch).as_text()  # pylint: disable=protected-access
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  # [batch, length, embed]: batch over data x fsdp, length over the (size-1) context axis
  assert any('[{"data", "fsdp"}, {"context"}, {}]' in line for line in constraints), constraints[:5]
