"""Mesh construction, logical-axis rules and the shardings derived from param specs."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glmjax.model import presets
from glmjax.sharding import (DEFAULT_RULES, MeshConfig, batch_sharding, logical_to_spec, make_mesh,
                             opt_state_shardings, param_partition_specs, param_shardings,
                             resolve_axis_sizes)
from glmjax.trainer import OptimizerConfig, make_optimizer
from glmjax.model import init_params
from tests.train.helpers import tiny_model


def test_minus_one_fills_the_remaining_devices():
  assert resolve_axis_sizes(MeshConfig(data=-1, tensor=2), 8) == {"data": 4, "fsdp": 1, "stage": 1,
                                                                   "context": 1, "tensor": 2, "expert": 1}
  assert resolve_axis_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2


@pytest.mark.parametrize("config, devices, needle", [
    (MeshConfig(data=3, fsdp=1), 8, "multiply to 3 but there are 8 devices"),
    (MeshConfig(data=-1, tensor=3), 8, "does not divide the 8 devices"),
    (MeshConfig(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
    (MeshConfig(data=0), 8, "MeshConfig.data=0"),
])
def test_mesh_that_does_not_fit_fails_clearly(config, devices, needle):
  with pytest.raises(ValueError, match=needle):
    resolve_axis_sizes(config, devices)


def test_mesh_axes_and_device_count():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "stage", "context", "tensor", "expert")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "stage": 1, "context": 1, "tensor": 2, "expert": 1}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_default_rules_map_params_as_design_section_4():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  specs = param_partition_specs(tiny_model(), mesh, DEFAULT_RULES)
  assert specs["layers"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
  assert specs["layers"]["attn"]["wo"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["mlp"]["w_up"] == P(None, "fsdp", "tensor")
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")  # vocab, embed
  assert specs["layers"]["attn_norm"]["scale"] == P(None, "fsdp")


def test_size_one_axes_are_dropped_and_batch_takes_data_and_fsdp():
  mesh = make_mesh(MeshConfig(data=4, fsdp=2))
  assert logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, mesh) == P(("data", "fsdp"), None, None)
  assert batch_sharding(mesh, DEFAULT_RULES).spec == P(("data", "fsdp"), None)
  assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh) == P("fsdp", None)  # tensor=1 dropped


def test_rules_are_configurable():
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  rules = (("batch", "fsdp"), ("vocab", None), ("embed", "tensor"))
  assert logical_to_spec(("vocab", "embed"), rules, mesh) == P(None, "tensor")


def test_moe_experts_shard_over_expert_axis():
  config = dataclasses.replace(presets.get("tiny-moe"), num_experts=4)
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=4))
  specs = param_partition_specs(config, mesh, DEFAULT_RULES)
  assert specs["layers"]["mlp"]["w_up"] == P(None, "expert", "fsdp", None)


def test_indivisible_dimension_names_the_param_and_the_fix():
  config = tiny_model(num_kv_heads=1)  # MQA: one kv head cannot split over tensor=2
  mesh = make_mesh(MeshConfig(data=4, tensor=2))
  with pytest.raises(ValueError, match=r"param \['layers'\]\['attn'\]\['wk'\].*'kv_heads'.*tensor = 2"):
    param_partition_specs(config, mesh, DEFAULT_RULES)
  relaxed = DEFAULT_RULES + (("kv_heads", None),)
  relaxed = tuple(r for r in relaxed if r != ("kv_heads", "tensor"))
  assert param_partition_specs(config, mesh, relaxed)["layers"]["attn"]["wk"] == P(None, None, None, None)


def test_params_are_born_sharded():
  config = tiny_model()
  mesh = make_mesh(MeshConfig(data=1, fsdp=8))
  shardings = param_shardings(config, mesh, DEFAULT_RULES)
  params = jax.jit(lambda k: init_params(config, k), out_shardings=shardings)(jax.random.PRNGKey(0))
  wq = params["layers"]["attn"]["wq"]
  assert wq.sharding.spec == P(None, "fsdp", None, None)
  # Each device holds 1/8 of the embed dimension, never the whole array.
  assert {s.data.shape for s in wq.addressable_shards} == {(2, 4, 4, 8)}
  whole = init_params(config, jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(wq), np.asarray(whole["layers"]["attn"]["wq"]), rtol=1e-6, atol=1e-8)


def test_adam_moments_follow_their_params_and_counts_are_replicated():
  config = tiny_model()
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  optimizer, _ = make_optimizer(OptimizerConfig(), num_steps=10)
  p_shardings = param_shardings(config, mesh, DEFAULT_RULES)
  abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
  state_shardings = opt_state_shardings(optimizer, abstract, p_shardings, mesh)
  flat = jax.tree_util.tree_flatten_with_path(state_shardings)[0]
  mu_wq = [s for path, s in flat if "mu" in jax.tree_util.keystr(path) and "wq" in jax.tree_util.keystr(path)]
  assert mu_wq and all(s.spec == P(None, "fsdp", "tensor", None) for s in mu_wq)
  counts = [s for path, s in flat if "count" in jax.tree_util.keystr(path)]
  assert counts and all(s.spec == P() for s in counts)


def test_adafactor_factored_statistics_are_replicated():
  config = tiny_model(d_model=256, ffn_dim=512, vocab_size=256)  # dims >= 128 get factored
  mesh = make_mesh(MeshConfig(data=1, fsdp=8))
  optimizer, _ = make_optimizer(OptimizerConfig(name="adafactor", schedule="constant"), num_steps=10)
  p_shardings = param_shardings(config, mesh, DEFAULT_RULES)
  abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
  state_shardings = opt_state_shardings(optimizer, abstract, p_shardings, mesh)
  # Every sharding must fit its leaf (factored row/col statistics have other shapes).
  abstract_state = jax.eval_shape(optimizer.init, abstract)
  for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(state_shardings)):
    sharding.shard_shape(leaf.shape)
