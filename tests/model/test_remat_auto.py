"""remat_policy="auto" (the default): the CPU step saves matmul outputs (the fast path there,
benchmarks/train_throughput.py), a step traced for TPU devices rematerialises everything; the
choice follows the mesh being traced for, not the host."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import ModelConfig, forward, init_params, presets
from glmjax.model import config as config_lib
from glmjax.model import transformer

CONFIG = dataclasses.replace(presets.get("tiny-llama"), num_layers=2)


def loss_jaxpr(config: ModelConfig) -> str:
  params = init_params(config, jax.random.key(0))
  tokens = jnp.zeros((2, 8), jnp.int32)
  return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(forward(p, {"tokens": tokens}, config))))(params))


def test_auto_is_the_default():
  assert ModelConfig().remat_policy == "auto"
  config_lib.validate(CONFIG)


def test_auto_on_cpu_is_the_saved_matmuls_policy():
  assert jax.default_backend() == "cpu"
  auto = loss_jaxpr(dataclasses.replace(CONFIG, remat_policy="auto"))
  assert auto == loss_jaxpr(dataclasses.replace(CONFIG, remat_policy="dots_and_attention_saveable"))
  assert auto != loss_jaxpr(dataclasses.replace(CONFIG, remat_policy="nothing_saveable"))


@pytest.mark.parametrize("platform, want", [("cpu", "dots_and_attention_saveable"),
                                            ("tpu", "nothing_saveable"), ("gpu", "nothing_saveable")])
def test_resolution_table(platform, want):
  assert config_lib.resolve_remat_policy("auto", platform) == want
  assert config_lib.resolve_remat_policy("dots_saveable", platform) == "dots_saveable"


def test_traced_platform_follows_the_mesh_of_a_tpu_topology():
  from jax.experimental import topologies  # libtpu (the test extra): TPU devices without a TPU
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  seen = []

  def traced(x):
    seen.append(transformer.traced_platform())
    return x

  with jax.set_mesh(mesh):
    jax.jit(traced).trace(jax.ShapeDtypeStruct((4,), jnp.float32))
  seen.append(transformer.traced_platform())  # outside: the host's backend
  assert seen == ["tpu", "cpu"]


def test_glmjax_compile_reports_the_policy_the_tpu_step_runs():
  from glmjax import aot
  from glmjax.trainer import Experiment
  assert aot.memory_options(Experiment())["remat_policy"] == "nothing_saveable"
  explicit = Experiment(model=dataclasses.replace(ModelConfig(), remat_policy="save_qkv_proj"))
  assert aot.memory_options(explicit)["remat_policy"] == "save_qkv_proj"
