"""Reward model: rewards are the head on the last response token's hidden state, the pairwise
loss is -log sigmoid(r_chosen - r_rejected) by hand, a few steps (head + LoRA) rank the pairs."""

import functools

import jax
import numpy as np
import optax

from glmjax.model import forward, init_params
from glmjax.tuning import lora as lora_lib
from glmjax.tuning import reward
from glmjax.tuning.lora import LoraConfig
from tests.train.helpers import tiny_model
from tests.tuning.helpers import pair_batch

CONFIG = tiny_model()


def _params(seed=0):
  base = init_params(CONFIG, jax.random.PRNGKey(seed))
  model = lora_lib.apply_lora(base, CONFIG, LoraConfig(rank=4, alpha=8.0, targets=("all",)), jax.random.PRNGKey(1))
  return {"model": model, "head": reward.init_head(CONFIG, jax.random.PRNGKey(2))}


def test_rewards_and_pairwise_loss_by_hand():
  params, batch = _params(), pair_batch(4, seed=5)
  hidden = np.asarray(reward.hidden_states(params["model"], batch, CONFIG))
  # the hidden states are the forward pass's: the LM head on them gives forward's logits
  np.testing.assert_allclose(hidden @ np.asarray(params["model"]["lm_head"]["kernel"]),
                             np.asarray(forward(params["model"], batch, CONFIG)), atol=1e-4)
  last = np.array([np.nonzero(row)[0].max() for row in batch["loss_mask"]])
  kernel, bias = np.asarray(params["head"]["kernel"]), float(params["head"]["bias"])
  want_r = hidden[np.arange(len(last)), last] @ kernel + bias
  r = np.asarray(reward.rewards(params, batch, CONFIG))
  np.testing.assert_allclose(r, want_r, rtol=1e-5, atol=1e-6)
  loss, metrics = reward.objective(params, batch, CONFIG)
  diff = want_r[0::2].astype(np.float64) - want_r[1::2]
  np.testing.assert_allclose(float(loss), np.mean(-np.log(1.0 / (1.0 + np.exp(-diff)))), rtol=1e-5)
  assert float(metrics["pairwise_accuracy"]) == np.mean(diff > 0)


def test_a_few_steps_rank_the_pairs_and_leave_the_base_alone():
  params, batch = _params(), pair_batch(8, seed=1)
  optimizer = reward.optimizer_for(optax.adam(1e-2), train_base=False)
  opt_state = optimizer.init(params)
  step = jax.jit(functools.partial(reward.train_step, config=CONFIG, optimizer=optimizer))
  old = params
  first = jax.device_get(reward.objective(params, batch, CONFIG)[1])
  for _ in range(8):
    params, opt_state, _ = step(params, opt_state, batch)
  after = jax.device_get(reward.objective(params, batch, CONFIG)[1])
  assert after["loss"] < first["loss"] and after["pairwise_accuracy"] > 0.5
  wq_old, wq_new = old["model"]["layers"]["attn"]["wq"], params["model"]["layers"]["attn"]["wq"]
  np.testing.assert_array_equal(np.asarray(wq_new.base), np.asarray(wq_old.base))
  np.testing.assert_array_equal(np.asarray(params["model"]["embed"]["embedding"]),
                                np.asarray(old["model"]["embed"]["embedding"]))
  assert np.any(np.asarray(params["head"]["kernel"]) != np.asarray(old["head"]["kernel"]))
