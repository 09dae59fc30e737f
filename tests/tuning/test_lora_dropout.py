"""LoRA dropout (PEFT's lora_dropout): train mode against peft with the same masks (logits and
adapter gradients), eval mode exactly the no-dropout forward, kept fraction ~ 1 - p.

The model-level tests install the hook this feature asks of glmjax.model.layers (matmul_2d
handing a weight that has its own `matmul_2d` the input) with monkeypatch, since layers.py is not
glmjax/tuning's: `_hooked_matmul_2d` below is the exact code the hook is to add."""

import jax
import jax.numpy as jnp
import numpy as np
import peft  # the test extra
import pytest
import torch
import transformers

from glmjax.export import peft as peft_io
from glmjax.export import to_huggingface
from glmjax.model import forward, layers
from glmjax.model.params import _path_hash
from glmjax.trainer import step as step_lib
from glmjax.tuning import lora as lora_lib
from glmjax.tuning.lora import LoraConfig
from tests.export.helpers import TOLERANCE, perturbed_params, random_tokens
from tests.train.helpers import tiny_model

CONFIG = tiny_model()
TOKENS = random_tokens(CONFIG.vocab_size, (2, 11))
RATE = 0.3
HF_NAMES = {"wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
            "wo": ("self_attn", "o_proj"), "w_gate": ("mlp", "gate_proj"), "w_up": ("mlp", "up_proj"),
            "w_down": ("mlp", "down_proj")}
GROUP = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w_gate": "mlp", "w_up": "mlp",
         "w_down": "mlp"}


@pytest.fixture
def hooked(monkeypatch):
  original = layers.matmul_2d

  def _hooked_matmul_2d(x, w_2d, **kwargs):
    if hasattr(w_2d, "matmul_2d"):  # a weight that needs its input (glmjax.tuning: LoRA dropout)
      return w_2d.matmul_2d(x, **kwargs)
    return original(x, w_2d, **kwargs)
  monkeypatch.setattr(layers, "matmul_2d", _hooked_matmul_2d)
  monkeypatch.setattr(layers, "INPUT_AWARE_WEIGHTS", True, raising=False)
  monkeypatch.setattr(step_lib, "TUNING_TRAIN_FORWARD", True, raising=False)


def _adapted(params, lora, seed=0):
  adapted = lora_lib.apply_lora(params, CONFIG, lora, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: lora_lib.LoraWeight(x.base, x.a, 0.3 * rng.standard_normal(x.b.shape).astype(np.float32),
                                    x.scale, x.in_ndim) if lora_lib.is_lora(x) else x,
      adapted, is_leaf=lora_lib.is_lora)


def _state_with_nonzero_b(program):
  """program.init_state(0) with every adapter's B drawn non-zero (B = 0 would hide the masks)."""
  state = program.init_state(0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: lora_lib.LoraWeight(x.base, x.a, 0.3 * rng.standard_normal(x.b.shape).astype(np.float32),
                                    x.scale, x.in_ndim) if lora_lib.is_lora(x) else x,
      state["params"], is_leaf=lora_lib.is_lora)
  return {**state, "params": jax.device_put(params, program.param_shardings)}


def _mask(key, name, layer, shape):
  """The documented mask, reproduced here from the key (lora.py module docstring)."""
  path = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey(GROUP[name]), jax.tree_util.DictKey(name))
  k = jax.random.fold_in(jax.random.fold_in(key, _path_hash(path)), layer)
  return np.asarray(jax.random.bernoulli(k, 1.0 - RATE, shape))


class _FixedMask(torch.nn.Module):
  def __init__(self, mask):
    super().__init__()
    self.mask = torch.tensor(mask, dtype=torch.float32)

  def forward(self, x):
    return x * self.mask.reshape(x.shape) / (1.0 - RATE)


def test_train_mode_equals_peft_with_the_same_masks_logits_and_grads(hooked, tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, targets=("all",), dropout=RATE)
  params = perturbed_params(CONFIG, seed=3)
  base_dir = str(tmp_path / "base")
  to_huggingface(params, CONFIG, base_dir, target="llama")
  adapted = _adapted(params, lora)
  peft_io.save_adapters(adapted, CONFIG, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
  key = jax.random.PRNGKey(7)
  tuning = lora_lib.LoraTuning(CONFIG, lora)
  weights = np.random.default_rng(1).standard_normal(TOKENS.shape + (CONFIG.vocab_size,)).astype(np.float32)
  batch = {"tokens": jnp.asarray(TOKENS)}

  def objective(p):
    logits, _ = tuning.train_forward(key)(p, batch, CONFIG)
    return jnp.sum(logits * weights), logits
  (_, ours), grads = jax.value_and_grad(objective, has_aux=True)(adapted)

  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"), is_trainable=True)
  model.train()
  tokens = TOKENS.size
  decoder = model.base_model.model.model
  for layer in range(CONFIG.num_layers):
    for name, (group, module) in HF_NAMES.items():
      mod = getattr(getattr(decoder.layers[layer], group), module)
      mod.lora_dropout["default"] = _FixedMask(_mask(key, name, layer, (tokens, mod.in_features)))
  theirs = model(torch.tensor(TOKENS, dtype=torch.long)).logits
  np.testing.assert_allclose(theirs.detach().numpy(), np.asarray(ours), atol=TOLERANCE, rtol=0)
  # the masks matter: eval mode (no dropout) is far from train mode
  assert np.abs(np.asarray(forward(adapted, batch, CONFIG)) - np.asarray(ours)).max() > 1e-2

  (theirs * torch.tensor(weights)).sum().backward()
  for layer in range(CONFIG.num_layers):
    for name, (group, module) in HF_NAMES.items():
      mod = getattr(getattr(decoder.layers[layer], group), module)
      g = grads["layers"][GROUP[name]][name]
      ga, gb = np.asarray(g.a[layer]), np.asarray(g.b[layer])
      np.testing.assert_allclose(mod.lora_A["default"].weight.grad.numpy().T.reshape(ga.shape), ga,
                                 atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(mod.lora_B["default"].weight.grad.numpy().T.reshape(gb.shape), gb,
                                 atol=1e-4, rtol=1e-4)
      assert np.all(np.asarray(g.base) == 0)  # the base is frozen


def test_eval_mode_is_exactly_the_no_dropout_forward(hooked):
  params = perturbed_params(CONFIG, seed=3)
  adapted = _adapted(params, LoraConfig(rank=4, alpha=8.0, targets=("all",), dropout=RATE))
  batch = {"tokens": jnp.asarray(TOKENS)}
  plain = np.asarray(forward(adapted, batch, CONFIG))
  # what eval / generate / export read: the LoraWeight tree, with or without the hook installed
  no_dropout = lora_lib.LoraTuning(CONFIG, LoraConfig(rank=4, alpha=8.0, targets=("all",)))
  np.testing.assert_array_equal(np.asarray(no_dropout.train_forward(jax.random.PRNGKey(0))(
      adapted, batch, CONFIG)[0]), plain)
  assert lora_lib.dropout_view(adapted, jax.random.PRNGKey(0), 0.0) is adapted
  # and with the dropout config too: eval reads the params as they are
  with_dropout = lora_lib.LoraTuning(CONFIG, LoraConfig(rank=4, alpha=8.0, targets=("all",), dropout=RATE))
  assert with_dropout.checkpoint_view({"params": adapted})["params"] is not None
  np.testing.assert_array_equal(np.asarray(forward(adapted, batch, CONFIG)), plain)


def test_kept_fraction_and_scale():
  n_in, tokens = 64, 4096
  eye = np.eye(n_in, dtype=np.float32)
  weight = lora_lib.LoraDropoutWeight(np.zeros((n_in, n_in), np.float32), eye, eye,
                                      jax.random.PRNGKey(3), 1.0, 1, RATE)
  out = np.asarray(weight.matmul_2d(jnp.ones((tokens, n_in), jnp.float32)))
  kept = out != 0
  n = kept.size
  assert abs(kept.mean() - (1 - RATE)) < 4 * np.sqrt(RATE * (1 - RATE) / n)
  np.testing.assert_allclose(out[kept], 1.0 / (1 - RATE), rtol=1e-6)
  other = lora_lib.LoraDropoutWeight(weight.base, eye, eye, jax.random.PRNGKey(4), 1.0, 1, RATE)
  assert (np.asarray(other.matmul_2d(jnp.ones((tokens, n_in)))) != 0).mean() != kept.mean() or \
      not np.array_equal(np.asarray(other.matmul_2d(jnp.ones((tokens, n_in)))) != 0, kept)


def test_dpo_step_threads_the_state_rng(hooked):
  """DPO's step draws its masks from fold_in(state rng, state step): its loss equals the objective
  by hand on dropout_view with that key, and differs between steps 0 and 1 at equal params."""
  from glmjax.sharding import MeshConfig
  from glmjax.trainer.optim import OptimizerConfig
  from glmjax.trainer.step import TrainProgram
  from glmjax.tuning import dpo as dpo_lib
  from tests.tuning.helpers import pair_batch
  lora = LoraConfig(rank=4, alpha=8.0, dropout=RATE)
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-12), MeshConfig(), num_steps=4,
                         global_batch_size=4, devices=jax.devices()[:1],
                         tuning=lora_lib.LoraTuning(CONFIG, lora))
  dpo = dpo_lib.DpoProgram(program, dpo_lib.DpoConfig(beta=0.5))
  state = _state_with_nonzero_b(program)
  rng, params = np.asarray(state["rng"]), jax.tree.map(np.asarray, state["params"])
  batch = pair_batch(2)
  expected = []
  for step in (0, 1):
    key = jax.random.fold_in(jnp.asarray(rng), step)
    loss, _ = dpo_lib.dpo_objective(params, {k: jnp.asarray(v) for k, v in batch.items()}, CONFIG,
                                    dpo.config, lora_lib.LoraTuning(CONFIG, lora).train_forward(key, forward))
    expected.append(float(loss))
  got = []
  for _ in range(2):
    state, metrics = dpo.train_step(state, batch)
    got.append(float(metrics["loss"]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert abs(got[0] - got[1]) > 1e-4  # a fresh mask each step


def test_bad_rate_and_unwired_step_are_refused_by_field():
  with pytest.raises(ValueError, match=r"LoraConfig.dropout=1.0 must be in \[0, 1\)"):
    lora_lib.validate(LoraConfig(rank=2, dropout=1.0))
  assert lora_lib.dropout_wired()  # layers.matmul_2d and the LM train step carry the hooks
  lora_lib.LoraTuning(CONFIG, LoraConfig(rank=2, dropout=0.1))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_lm_train_step_draws_masks_from_the_state_rng(microbatches):
  """The trainer's own LM step (no monkeypatch: the hooks are in layers.py / step.py): its loss
  at steps 0 and 1 equals the objective by hand on dropout_view(params, fold_in(rng, step))
  (microbatch i: fold_in of that, i), and the masks change between steps."""
  from glmjax.sharding import MeshConfig
  from glmjax.trainer import loss as loss_lib
  from glmjax.trainer.optim import OptimizerConfig
  from glmjax.trainer.step import StepConfig, TrainProgram, split_microbatches
  lora = LoraConfig(rank=4, alpha=8.0, dropout=RATE)
  tuning = lora_lib.LoraTuning(CONFIG, lora)
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-12), MeshConfig(), num_steps=4,
                         global_batch_size=4, devices=jax.devices()[:1], tuning=tuning,
                         step_config=StepConfig(microbatches=microbatches))
  state = _state_with_nonzero_b(program)
  rng, params = jnp.asarray(np.asarray(state["rng"])), jax.tree.map(np.asarray, state["params"])
  tokens = np.random.default_rng(3).integers(1, CONFIG.vocab_size, (4, 9)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((4, 8), np.float32)}
  expected = []
  for step in (0, 1):
    key = jax.random.fold_in(rng, step)
    parts = ([batch] if microbatches == 1 else
             [jax.tree.map(lambda x, i=i: x[i], split_microbatches(batch, microbatches)) for i in range(microbatches)])
    nll = weight = 0.0
    for i, part in enumerate(parts):
      k = key if microbatches == 1 else jax.random.fold_in(key, i)
      logits, _ = tuning.train_forward(k)(params, {n: jnp.asarray(v) for n, v in part.items()}, CONFIG)
      sums = loss_lib.token_loss_sums(logits, jnp.asarray(part["targets"]), jnp.asarray(part["loss_mask"]))
      nll, weight = nll + float(sums["nll_sum"]), weight + float(sums["weight_sum"])
    expected.append(nll / weight)
  got = []
  for _ in range(2):
    state, metrics = program.train_step(state, program.global_batch(batch))
    got.append(float(metrics["loss"]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert abs(got[0] - got[1]) > 1e-4
