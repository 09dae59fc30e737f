"""QLoRA's base is built quantized one layer at a time, never as a float32 base first: at init
(`quant.init_quantized_params`: compiled temporaries flat in depth and below the float
projections, where float-then-quantize grows with depth past them) and from a float base run
(`quant.load_quantized_base`: one projection read at a time, equal to quantizing the whole
restored base); layer-by-layer quantization equals quantizing the stack at once."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from glmjax.model import init_params
from glmjax.tuning import lora as lora_lib
from glmjax.tuning import quant
from tests.train.helpers import tiny_model
from tests.tuning.test_lora_train import REPO, run

CONFIG = tiny_model(num_layers=3)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_layer_by_layer_equals_the_whole_stack(kind):
  base = init_params(CONFIG, jax.random.PRNGKey(0))
  got = quant.quantize_params(base, CONFIG, kind)
  for group, name in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_down")):
    w = base["layers"][group][name]
    whole = quant.quantize_nf4(w, 1) if kind == "nf4" else quant.quantize_int8(w, 1, lora_lib.PROJECTIONS[name])
    for x, y in zip(_leaves(got["layers"][group][name]), _leaves(whole)):
      np.testing.assert_array_equal(x, y)


def test_init_quantized_matches_the_float_init_in_structure_and_statistics():
  rng = jax.random.PRNGKey(1)
  reference = jax.eval_shape(lambda: quant.quantize_params(init_params(CONFIG, rng), CONFIG, "nf4"))
  built = quant.init_quantized_params(CONFIG, rng, "nf4")
  assert jax.tree.structure(built) == jax.tree.structure(reference)
  for x, y in zip(jax.tree.leaves(built), jax.tree.leaves(reference)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
  float_base = init_params(CONFIG, rng)
  np.testing.assert_array_equal(np.asarray(built["embed"]["embedding"]),
                                np.asarray(float_base["embed"]["embedding"]))  # non-projections: init_params'
  w = np.asarray(built["layers"]["mlp"]["w_up"].dense())
  assert abs(w.std() / CONFIG.init_std - 1) < 0.1  # the initializer's scale, per layer
  assert not np.array_equal(w[0], w[1])  # layers drawn apart
  again = quant.init_quantized_params(CONFIG, rng, "nf4")
  for x, y in zip(_leaves(built), _leaves(again)):
    np.testing.assert_array_equal(x, y)  # deterministic: resume and load rebuild the same base


def _temp_bytes(fn):
  return jax.jit(fn).lower(jax.random.PRNGKey(0)).compile().memory_analysis().temp_size_in_bytes


def test_init_peak_is_flat_in_depth_and_below_the_float_base():
  temps = {}
  for layers in (4, 32):
    config = tiny_model(num_layers=layers, d_model=64, ffn_dim=512, num_heads=4, num_kv_heads=2,
                        head_dim=16)
    float_bytes = quant.projection_bytes(jax.eval_shape(lambda c=config: init_params(c, jax.random.PRNGKey(0))))
    old = _temp_bytes(lambda r, c=config: quant.quantize_params(init_params(c, r), c, "nf4"))
    new = _temp_bytes(lambda r, c=config: quant.init_quantized_params(c, r, "nf4"))
    temps[layers] = (old, new, float_bytes)
  old32, new32, float32 = temps[32]
  assert old32 > float32 > 4 * new32, temps  # float-then-quantize holds more than the float base
  assert old32 > 6 * temps[4][0], temps  # float-then-quantize: ~linear in depth (8x the layers)
  assert new32 < 1.25 * temps[4][1], temps  # layer by layer: nearly flat


def test_quantized_base_from_a_float_run_equals_quantizing_the_restored_base(tmp_path):
  from glmjax import sharding as shd
  from glmjax.run import load as load_lib
  old = os.getcwd()
  os.chdir(REPO)
  try:
    assert run("experiments/llama_small_causal_lm.gin", str(tmp_path / "base"), 1) == 0
  finally:
    os.chdir(old)
  loaded = load_lib.load_params(str(tmp_path / "base"), devices=jax.devices()[:1])
  experiment = loaded.experiment
  mesh = shd.make_mesh(dataclasses.replace(experiment.mesh, data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = shd.normalise_rules(experiment.mesh.rules)
  got = quant.load_quantized_base(experiment.model, loaded.workdir.checkpoints, loaded.step, mesh, rules, "nf4")
  want = quant.quantize_params(loaded.params, experiment.model, "nf4")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for x, y in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(x, y)
  tuning = lora_lib.LoraTuning(experiment.model, lora_lib.LoraConfig(
      rank=2, quantize="nf4", base_checkpoint=str(tmp_path / "base")))
  through_tuning = tuning.load_base(mesh, rules)
  assert quant.is_quantized(through_tuning["layers"]["attn"]["wq"])
