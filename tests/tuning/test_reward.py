"""Reward model: rewards are the head on the last response token's hidden state, the pairwise
loss is -log sigmoid(r_chosen - r_rejected) by hand, a few steps (head + LoRA) rank the pairs."""

import functools

import jax
import numpy as np
import optax
import pytest

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


def test_pairwise_accuracy_over_a_task_equals_a_hand_count():
  """7 pairs in batches of 3 (the last padded), one pair dropped (prompt too long): the accuracy
  is the hand count of r_chosen > r_rejected, each reward computed by hand from one pair's rows."""
  import uuid
  from glmjax.tasks import preference
  from glmjax.tasks import vocab as vocab_lib
  words = "the quick brown fox jumps over a lazy dog while seven small birds sing at dawn".split()
  rng = np.random.default_rng(3)
  records = [{"prompt": " ".join(rng.choice(words, 4)), "chosen": " ".join(rng.choice(words, 3)),
              "rejected": " ".join(rng.choice(words, int(rng.integers(2, 5))))} for _ in range(7)]
  records.insert(4, {"prompt": " ".join(words * 3), "chosen": "a", "rejected": "b"})
  name = f"glmjax_test_reward_{uuid.uuid4().hex[:8]}"
  preference.register_preference_task(name, lambda split: records)
  config = tiny_model(vocab_size=8192)  # the task's (default) vocabulary
  base = init_params(config, jax.random.PRNGKey(4))
  params = {"model": base, "head": reward.init_head(config, jax.random.PRNGKey(5))}
  try:
    result = reward.pairwise_accuracy(params, config, name, "validation", sequence_length=24,
                                      pairs_per_batch=3)
  finally:
    import seqio
    seqio.TaskRegistry.remove(name)
  vocabulary = vocab_lib.default_vocabulary()
  ids = vocab_lib.special_ids(vocabulary)
  kernel, bias = np.asarray(params["head"]["kernel"]), float(params["head"]["bias"])
  margins = []
  for rec in records:
    rows = preference.pair_rows(vocabulary.encode(rec["prompt"]), vocabulary.encode(rec["chosen"]),
                                vocabulary.encode(rec["rejected"]), 24, "instruction", ids)
    if rows is None:
      continue
    hidden = np.asarray(reward.hidden_states(params["model"], rows, config))
    last = [int(np.nonzero(m)[0].max()) for m in rows["loss_mask"]]
    r = [float(hidden[i, last[i]] @ kernel + bias) for i in range(2)]
    margins.append(r[0] - r[1])
  margins = np.asarray(margins)
  assert result["pairs"] == len(margins) == 7 and result["dropped"] == 1
  assert 0 < np.sum(margins > 0) < 7  # not all one way: the count means something
  assert result["pairwise_accuracy"] == np.mean(margins > 0)
  np.testing.assert_allclose(result["mean_margin"], margins.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(result["bt_loss"], np.mean(-np.log(1 / (1 + np.exp(-margins)))), rtol=1e-4)


def test_pairwise_accuracy_refuses_ids_past_the_vocabulary():
  from glmjax.tasks import preference
  task = preference.register_toy_task()  # default vocabulary (8192 ids) against a 64-id model
  with pytest.raises(ValueError, match="vocab"):
    reward.pairwise_accuracy(_params(), CONFIG, task, "validation", sequence_length=48, max_pairs=2)
