"""DPO: loss and gradients against the papers' formulas in NumPy, log 2 at policy = reference,
preference accuracy above chance after a few LoRA DPO steps, precomputed reference log-probs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import init_params
from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, TrainProgram
from glmjax.tuning import dpo as dpo_lib
from glmjax.tuning.dpo import DpoConfig, DpoProgram
from glmjax.tuning.lora import LoraConfig, LoraTuning
from tests.train.helpers import tiny_model
from tests.tuning.helpers import pair_batch

CONFIG = tiny_model()
VARIANTS = [DpoConfig(beta=0.1), DpoConfig(beta=0.5, label_smoothing=0.2), DpoConfig(beta=0.3, loss_type="ipo")]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_dpo(pc, pr, rc, rr, nc, nr, config):
  """(losses, dL/dpc, dL/dpr) by hand: DPO eq. 7 / cDPO / IPO eq. 17 (per-token averaged)."""
  b, eps = config.beta, config.label_smoothing
  if config.loss_type == "ipo":
    d = (pc - rc) / nc - (pr - rr) / nr - 1.0 / (2.0 * b)
    return d ** 2, 2.0 * d / nc, -2.0 * d / nr
  h = b * ((pc - rc) - (pr - rr))
  losses = -(1.0 - eps) * np.log(_sigmoid(h)) - eps * np.log(_sigmoid(-h))
  dh = -(1.0 - eps) * _sigmoid(-h) + eps * _sigmoid(h)
  return losses, b * dh, -b * dh


@pytest.mark.parametrize("config", VARIANTS, ids=["dpo", "cdpo", "ipo"])
def test_loss_and_gradients_equal_the_formula(config):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20.0, 3.0, 16) for _ in range(4))
  nc, nr = rng.integers(1, 9, 16).astype(np.float64), rng.integers(1, 9, 16).astype(np.float64)
  pc, pr, rc, rr, nc, nr = (x.astype(np.float32) for x in (pc, pr, rc, rr, nc, nr))
  f = lambda a, b: jnp.sum(dpo_lib.dpo_loss(a, b, rc, rr, config, nc, nr)[0])  # noqa: E731
  losses, metrics = dpo_lib.dpo_loss(pc, pr, rc, rr, config, nc, nr)
  grad_c, grad_r = jax.grad(f, argnums=(0, 1))(pc, pr)
  args = [x.astype(np.float64) for x in (pc, pr, rc, rr, nc, nr)]
  want, want_c, want_r = numpy_dpo(*args, config)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  np.testing.assert_allclose(grad_c, want_c, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad_r, want_r, rtol=1e-5, atol=1e-7)
  rw, rl = config.beta * (args[0] - args[2]), config.beta * (args[1] - args[3])
  np.testing.assert_allclose(metrics["rewards_margin"], np.mean(rw - rl), rtol=1e-5)
  assert float(metrics["preference_accuracy"]) == np.mean(rw > rl)


def _lora_program(devices, mesh):
  return TrainProgram(CONFIG, OptimizerConfig(learning_rate=2e-2, schedule="constant", weight_decay=0.0),
                      mesh, num_steps=10, global_batch_size=16, devices=devices,
                      tuning=LoraTuning(CONFIG, LoraConfig(rank=4, alpha=8.0, targets=("all",))))


@pytest.fixture(scope="module")
def lora_dpo():
  program = _lora_program(jax.devices(), MeshConfig(data=-1))
  return program, DpoProgram(program, DpoConfig(beta=0.5))


def test_policy_equal_to_reference_gives_log_2(lora_dpo):
  program, dpo = lora_dpo
  state = program.init_state(0)  # B = 0: the policy is the base, the reference
  metrics = jax.device_get(dpo.metrics(state["params"], pair_batch(8)))
  assert metrics["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert metrics["rewards_margin"] == 0.0 and metrics["preference_accuracy"] == 0.0


def test_a_few_lora_dpo_steps_raise_preference_accuracy(lora_dpo):
  program, dpo = lora_dpo
  state = program.init_state(0)
  train, held_out = pair_batch(8, seed=1), pair_batch(8, seed=2)
  for _ in range(6):
    state, metrics = dpo.train_step(state, train)
  after = jax.device_get(dpo.metrics(state["params"], train))
  assert after["preference_accuracy"] > 0.5 and after["loss"] < math.log(2.0)
  assert after["rewards_chosen"] > after["rewards_rejected"]
  held = jax.device_get(dpo.metrics(state["params"], held_out))
  assert held["rewards_margin"] > 0.0


def test_full_fine_tune_with_precomputed_reference():
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                         MeshConfig(data=-1), num_steps=2, global_batch_size=4, devices=jax.devices()[:2])
  dpo = DpoProgram(program, DpoConfig(beta=0.1, loss_type="ipo"))
  state = program.init_state(0)
  batch = pair_batch(2, seed=3)
  params0 = init_params(CONFIG, jax.random.PRNGKey(0))
  batch["reference_logps"] = np.asarray(dpo_lib.reference_logps(params0, batch, CONFIG))
  metrics = jax.device_get(dpo.metrics(state["params"], batch))
  assert metrics["loss"] == pytest.approx((1.0 / (2 * 0.1)) ** 2, rel=1e-6)  # IPO at s = 0
  state, _ = dpo.train_step(state, batch)
  assert jax.device_get(dpo.metrics(state["params"], batch))["loss"] < metrics["loss"]
  del batch["reference_logps"]
  with pytest.raises(ValueError, match="reference"):
    dpo.metrics(state["params"], batch)


@pytest.mark.parametrize("config, field", [
    (DpoConfig(beta=0.0), "DpoConfig.beta"), (DpoConfig(loss_type="kto"), "DpoConfig.loss_type"),
    (DpoConfig(label_smoothing=0.7), "DpoConfig.label_smoothing")])
def test_bad_config_names_the_field(config, field):
  with pytest.raises(ValueError, match=field):
    dpo_lib.validate(config)
