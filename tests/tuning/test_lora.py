"""LoRA: B = 0 is the base, a step moves adapters only, merge, mesh equality, bad input."""

import dataclasses

import jax
import numpy as np
import pytest

from glmjax.model import forward, init_params
from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, TrainProgram
from glmjax.tuning import lora as lora_lib
from glmjax.tuning.lora import LoraConfig, LoraTuning
from tests.train.helpers import random_batches, tiny_model

CONFIG = tiny_model()
LORA = LoraConfig(rank=4, alpha=8.0, targets=("all",))
BATCHES = random_batches(1, 8, 16, seed=3) * 3  # one batch thrice: its loss must fall


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params, is_leaf=lora_lib.is_lora)[0]


def test_zero_b_equals_the_base_exactly():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  adapted = lora_lib.apply_lora(params, CONFIG, LORA, jax.random.PRNGKey(1))
  assert all(np.all(np.asarray(leaf.b) == 0) and np.any(np.asarray(leaf.a) != 0)
             for _, leaf in _leaves(adapted) if lora_lib.is_lora(leaf))
  np.testing.assert_array_equal(np.asarray(forward(adapted, BATCHES[0], CONFIG)),
                                np.asarray(forward(params, BATCHES[0], CONFIG)))


def test_adapters_sit_beside_their_projection_with_its_logical_axes():
  specs = lora_lib.lora_specs(CONFIG, LoraConfig(rank=4))
  wq, wo = specs["layers"]["attn"]["wq"], specs["layers"]["attn"]["wo"]
  assert lora_lib.is_lora(wq) and lora_lib.is_lora(specs["layers"]["attn"]["wv"])
  assert not lora_lib.is_lora(specs["layers"]["attn"]["wk"]) and not lora_lib.is_lora(specs["layers"]["mlp"]["w_up"])
  assert wq.a.shape == (2, 32, 4) and wq.a.axes == ("layers", "embed", None)
  assert wq.b.shape == (2, 4, 4, 8) and wq.b.axes == ("layers", None, "heads", "head_dim")
  all_specs = lora_lib.lora_specs(CONFIG, LORA)
  wo = all_specs["layers"]["attn"]["wo"]
  assert wo.a.shape == (2, 4, 8, 4) and wo.b.axes == ("layers", None, "embed")
  assert {name for name in ("w_up", "w_gate", "w_down") if lora_lib.is_lora(all_specs["layers"]["mlp"][name])} == {
      "w_up", "w_gate", "w_down"}


def _run(devices, mesh):
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-2, schedule="constant"), mesh,
                         num_steps=len(BATCHES), global_batch_size=8, devices=devices,
                         tuning=LoraTuning(CONFIG, LORA))
  state = program.init_state(0)
  before = jax.device_get(state["params"])
  losses = []
  for batch in BATCHES:
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return {"before": before, "after": jax.device_get(state["params"]), "losses": losses,
          "opt_state": jax.device_get(state["opt_state"])}


@pytest.fixture(scope="module")
def runs():
  return {"one": _run(jax.devices()[:1], MeshConfig(data=-1)),
          "eight": _run(jax.devices(), MeshConfig(data=1, fsdp=4, tensor=2))}


def test_a_lora_step_changes_the_adapters_only(runs):
  run = runs["one"]
  before, after = dict(_leaves(run["before"])), dict(_leaves(run["after"]))
  assert before.keys() == after.keys()
  adapted = 0
  for path, old in before.items():
    new = after[path]
    if lora_lib.is_lora(old):
      adapted += 1
      np.testing.assert_array_equal(new.base, old.base)  # bit-identical
      assert np.any(np.asarray(new.b) != 0) and np.any(np.asarray(new.a) != np.asarray(old.a))
    else:
      np.testing.assert_array_equal(new, old)
  assert adapted == 7
  assert run["losses"][-1] < run["losses"][0]


def test_optimizer_state_holds_adapters_only(runs):
  adapter_size = sum(np.size(leaf.a) + np.size(leaf.b) for _, leaf in _leaves(runs["one"]["after"])
                     if lora_lib.is_lora(leaf))
  state_size = sum(np.size(x) for x in jax.tree.leaves(runs["one"]["opt_state"]) if np.ndim(x))
  assert state_size == 2 * adapter_size  # Adam's mu and nu of the adapters; nothing of the base


def test_merged_forward_equals_the_adapter_forward(runs):
  params = runs["one"]["after"]
  merged = lora_lib.merge(params)
  assert not any(lora_lib.is_lora(leaf) for _, leaf in _leaves(merged))
  np.testing.assert_allclose(np.asarray(forward(merged, BATCHES[0], CONFIG)),
                             np.asarray(forward(params, BATCHES[0], CONFIG)), atol=1e-5, rtol=0)


def test_fsdp_by_tensor_mesh_equals_one_device(runs):
  np.testing.assert_allclose(runs["eight"]["losses"], runs["one"]["losses"], rtol=1e-5)
  for (path, one), (_, eight) in zip(_leaves(runs["one"]["after"]), _leaves(runs["eight"]["after"])):
    if lora_lib.is_lora(one):
      np.testing.assert_allclose(eight.a, one.a, atol=1e-5, err_msg=str(path))
      np.testing.assert_allclose(eight.b, one.b, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("lora, field", [
    (LoraConfig(rank=-1), "LoraConfig.rank"),
    (LoraConfig(rank=4, alpha=0.0), "LoraConfig.alpha"),
    (LoraConfig(rank=4, targets=("wq", "q_proj")), "LoraConfig.targets"),
    (LoraConfig(rank=4, targets=()), "LoraConfig.targets"),
])
def test_bad_config_is_one_line_naming_the_field(lora, field):
  with pytest.raises(ValueError, match=field) as info:
    lora_lib.lora_specs(CONFIG, lora)
  assert "\n" not in str(info.value)


def test_absent_projection_is_named():
  with pytest.raises(ValueError, match="LoraConfig.targets: \\['w_gate'\\]"):
    lora_lib.lora_specs(dataclasses.replace(CONFIG, ffn="gelu"),
                       LoraConfig(rank=2, targets=("w_gate",)))


def test_qlora_steps_on_the_fsdp_by_tensor_mesh_keep_the_base_quantized():
  from glmjax.tuning import quant
  qlora = LoraConfig(rank=4, alpha=8.0, targets=("all",), quantize="nf4")
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                         MeshConfig(data=1, fsdp=4, tensor=2), num_steps=3, global_batch_size=8,
                         tuning=LoraTuning(CONFIG, qlora))
  state = program.init_state(0)
  codes = np.asarray(state["params"]["layers"]["mlp"]["w_up"].base.codes)
  losses = []
  for batch in BATCHES:
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  w_up = state["params"]["layers"]["mlp"]["w_up"]
  assert quant.is_quantized(w_up.base) and w_up.base.codes.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(w_up.base.codes), codes)
  assert losses[-1] < losses[0] and np.any(np.asarray(w_up.b) != 0)
