"""NF4 / int8 weight quantization: the NF4 levels from bitsandbytes' formula, dequantization equal
to the reference formulas in NumPy, base memory, a QLoRA step with the base staying quantized,
greedy decoding with int8 / NF4 weights against float."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

from glmjax.generate.decoding import GenerationOptions, generate
from glmjax.model import forward, init_params, presets
from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, TrainProgram
from glmjax.trainer import loss as loss_lib
from glmjax.tuning import lora as lora_lib
from glmjax.tuning import quant
from glmjax.tuning.lora import LoraConfig
from tests.train.helpers import random_batches, tiny_model
from tests.tuning.helpers import progression_batches


def test_nf4_levels_are_bitsandbytes_normal_map():
  # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True): QLoRA eq. 4 with an exact 0
  offset = 0.9677083
  v1 = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  v3 = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([v1, [0.0], v3]))
  np.testing.assert_allclose(quant.NF4_LEVELS, levels / levels.max(), atol=1e-7)


def numpy_nf4_dequant(q):
  """QLoRA eq. 6 by hand: W = q[idx] * (c2_int8 * c1 / 127 + mean)."""
  codes = np.asarray(q.codes)
  idx = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(codes.shape[:-1] + (-1,))
  c2 = np.asarray(q.absmax_q, np.float64) * np.asarray(q.scale, np.float64)[..., None] / 127.0
  c2 = c2.reshape(c2.shape[0], -1)[:, :codes.shape[-2]] + np.asarray(q.absmax_mean, np.float64)[:, None]
  values = quant.NF4_LEVELS[idx].astype(np.float64) * c2[..., None]
  size = int(np.prod(q.weight_shape))
  return values.reshape(values.shape[0], -1)[:, :size].reshape((values.shape[0],) + q.weight_shape)


def test_nf4_quantize_and_dequantize_equal_the_reference():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((2, 30, 7, 5)).astype(np.float32) * 0.05  # 1050 values: padded blocks
  q = quant.quantize_nf4(w, lead=1)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 17, 32)
  assert q.absmax_q.dtype == jnp.int8 and q.absmax_q.shape == (2, 1, 256)
  np.testing.assert_allclose(np.asarray(q.dense()), numpy_nf4_dequant(q), rtol=1e-6, atol=1e-8)
  # the indices are the nearest NF4 levels of each value over its block's (exact) absmax
  blocks = np.pad(w.reshape(2, -1), [(0, 0), (0, 17 * 64 - 1050)]).reshape(2, 17, 64)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  want = np.abs((blocks / absmax)[..., None] - quant.NF4_LEVELS).argmin(-1)
  codes = np.asarray(q.codes)
  np.testing.assert_array_equal(np.stack([codes & 0xF, codes >> 4], -1).reshape(2, 17, 64), want)
  # reconstruction error: half a level gap times the absmax, plus the double-quantization error
  err = np.abs(np.asarray(q.dense()) - w).reshape(2, -1).max()
  assert err <= 0.5 * np.diff(quant.NF4_LEVELS).max() * absmax.max() * 1.02


def test_int8_per_channel_equals_the_reference():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 4, 8, 32)).astype(np.float32)  # wo-like: in dims (4, 8)
  q = quant.quantize_int8(w, lead=1, in_ndim=2)
  s = np.abs(w).max(axis=(1, 2), keepdims=True)
  codes = np.round(w / s * 127.0)
  np.testing.assert_array_equal(np.asarray(q.codes), codes.astype(np.int8))
  np.testing.assert_allclose(np.asarray(q.dense()), codes * s / 127.0, rtol=1e-6)


def test_base_memory_on_llama_small():
  config = presets.get("llama-small")
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
  float_bytes = quant.projection_bytes(shapes)
  ratios = {}
  for kind in quant.KINDS:
    quantized = jax.eval_shape(lambda p, k=kind: quant.quantize_params(p, config, k), shapes)
    ratios[kind] = quant.projection_bytes(quantized) / float_bytes
  assert 1 / 8 < ratios["nf4"] < 1 / 7.5  # 4.13 bits per weight with double quantization
  assert 1 / 4 <= ratios["int8"] < 0.252


CONFIG = dataclasses.replace(tiny_model(), init_std=0.3)  # peaked logits: greedy choices are clear


def test_qlora_step_keeps_the_base_quantized():
  base = quant.quantize_params(init_params(CONFIG, jax.random.PRNGKey(0)), CONFIG, "nf4")
  params = lora_lib.apply_lora(base, CONFIG, LoraConfig(rank=4, alpha=8.0, targets=("all",)), jax.random.PRNGKey(1))
  batch = random_batches(1, 8, 16, seed=2)[0]

  def loss(adapters):
    full = lora_lib.with_base(adapters, params)
    sums = loss_lib.token_loss_sums(forward(full, batch, CONFIG), batch["targets"], batch["loss_mask"])
    return sums["nll_sum"] / sums["weight_sum"]

  optimizer = optax.adam(1e-2)
  adapters = lora_lib.adapters_only(params)
  state = optimizer.init(adapters)

  @jax.jit
  def step(adapters, state):
    value, grads = jax.value_and_grad(loss)(adapters)
    updates, state = optimizer.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  losses = []
  for _ in range(4):
    adapters, state, value = step(adapters, state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  after = lora_lib.with_base(adapters, params)
  wq = after["layers"]["attn"]["wq"]
  assert quant.is_quantized(wq.base) and wq.base.codes.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(wq.base.codes), np.asarray(params["layers"]["attn"]["wq"].base.codes))
  assert np.any(np.asarray(wq.b) != 0)


@pytest.fixture(scope="module")
def trained():
  """tiny-llama trained 80 steps on arithmetic progressions (loss ~0.16): confident greedy choices."""
  config = tiny_model()
  program = TrainProgram(config, OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.0),
                         MeshConfig(data=-1), num_steps=80, global_batch_size=16, devices=jax.devices()[:1])
  state = program.init_state(0)
  batches = progression_batches(16)
  for i in range(80):
    state, _ = program.train_step(state, batches[i % 16])
  return config, jax.device_get(state["params"]), batches[0]


@pytest.mark.parametrize("kind", quant.KINDS)
def test_greedy_tokens_match_float(trained, kind):
  config, params, batch = trained
  quantized = quant.quantize_params(params, config, kind)
  prompts = [[5, 7, 9, 11], [20, 21, 22, 23], [40, 43, 46, 49], [10, 12, 14]]
  options = GenerationOptions(max_new_tokens=12, strategy="greedy")
  tokens = np.asarray(generate(quantized, config, prompts, options).tokens)
  want = np.asarray(generate(params, config, prompts, options).tokens)
  assert np.mean(tokens == want) >= 0.9
  logits, float_logits = (np.asarray(forward(p, batch, config)) for p in (quantized, params))
  mask = batch["loss_mask"] > 0
  error = np.abs(logits - float_logits)[mask].max() / np.abs(float_logits[mask]).max()
  assert error < {"int8": 0.02, "nf4": 0.15}[kind]


def test_unknown_kind_is_named():
  with pytest.raises(ValueError, match="quantize kind='int3'"):
    quant.quantize_params(init_params(CONFIG, jax.random.PRNGKey(0)), CONFIG, "int3")
