"""Optimizer-state memory options: Adam's moments in their own dtype (OptimizerConfig.mu_dtype /
nu_dtype) and the state split over the data axis too (OptimizerConfig.state_sharding = 'data')."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glmjax import config_gin
from glmjax.cli import train as train_cli
from glmjax.model import init_params
from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, StepConfig, TrainProgram
from glmjax.trainer import optim
from tests.train.helpers import random_batches, tiny_model

BASE = OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1)


def run_updates(config, steps=4):
  params = init_params(tiny_model(), jax.random.PRNGKey(0))
  optimizer, _ = optim.make_optimizer(config, num_steps=10)
  state = optimizer.init(params)
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), params)
    params, state = step(params, state, grads)
  return jax.device_get(params), state


def test_adam_with_float32_moments_spelled_out_equals_optax_adamw():
  """The dtype-aware Adam (used whenever mu_dtype or nu_dtype is set) is optax's adamw."""
  want, _ = run_updates(BASE)
  got, state = run_updates(dataclasses.replace(BASE, mu_dtype="float32", nu_dtype="float32"))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_bfloat16_moments_are_stored_in_bfloat16_and_stay_close():
  want, _ = run_updates(BASE)
  got, state = run_updates(dataclasses.replace(BASE, mu_dtype="bfloat16", nu_dtype="bfloat16"))
  adam = state[1][0]  # chain(clip, chain(adam, decay, lr)) -> the adam state
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=4 * 1e-2 * 4 * 1e-2)  # << lr per step


def test_adafactor_momentum_dtype():
  config = OptimizerConfig(name="adafactor", schedule="constant", adafactor_momentum=0.9,
                           mu_dtype="bfloat16")
  _, state = run_updates(config, steps=1)
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim >= 2}
  assert jnp.dtype(jnp.bfloat16) in dtypes


def program(optimizer, mesh=MeshConfig(data=2, fsdp=2, tensor=2)):
  return TrainProgram(tiny_model(), optimizer, mesh, num_steps=2, global_batch_size=8,
                      step_config=StepConfig())


def test_bfloat16_moments_halve_the_compiled_state_and_train():
  f32, bf16 = program(BASE), program(dataclasses.replace(BASE, mu_dtype="bfloat16", nu_dtype="bfloat16"))
  args = [p.lower("train", 16).compile().memory_analysis().argument_size_in_bytes for p in (f32, bf16)]
  assert args[1] < args[0]
  state = bf16.init_state(0)
  for batch in random_batches(2, 8, 16, seed=1):
    state, metrics = bf16.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])


def test_state_sharded_over_data_splits_the_moments_and_equals_the_default():
  mesh = MeshConfig(data=4, fsdp=2, tensor=1)
  default, zero1 = program(BASE, mesh), program(dataclasses.replace(BASE, state_sharding="data"), mesh)
  specs = [s.spec for s in jax.tree.leaves(zero1.state_shardings["opt_state"],
                                           is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))]
  assert any("data" in str(spec) for spec in specs)
  per_device = [p.lower("train", 16).compile().memory_analysis().argument_size_in_bytes
                for p in (default, zero1)]
  assert per_device[1] < per_device[0]
  out = []
  for prog in (default, zero1):
    state = prog.init_state(0)
    for batch in random_batches(2, 8, 16, seed=2):
      state, metrics = prog.train_step(state, batch)
    out.append(jax.device_get(state["params"]))
  for g, w in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[0])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binding, field", [
    ("OptimizerConfig.mu_dtype = 'bf16'", "mu_dtype"),
    ("OptimizerConfig.state_sharding = 'zero1'", "state_sharding"),
])
def test_a_bad_optimizer_state_option_is_exit_2_with_one_line(binding, field, capsys):
  config_gin.clear()
  try:
    code = train_cli.main(["--gin_file", "experiments/demo.gin", "--gin", binding, "--workdir", "unused"])
  finally:
    config_gin.clear()
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and field in err, err


def test_gin_selects_the_optimizer_state_options():
  config_gin.clear()
  try:
    config_gin.parse(["experiments/demo.gin"], ["OptimizerConfig.mu_dtype = 'bfloat16'",
                                                "OptimizerConfig.nu_dtype = 'bfloat16'",
                                                "OptimizerConfig.state_sharding = 'data'"])
    opt = config_gin.build_experiment().optimizer
  finally:
    config_gin.clear()
  assert (opt.mu_dtype, opt.nu_dtype, opt.state_sharding) == ("bfloat16", "bfloat16", "data")
