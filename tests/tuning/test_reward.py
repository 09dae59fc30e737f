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


def test_wrapped_optimizer_reads_the_model_names_and_keeps_its_state_nested():
  """On {"model", "head"} params the run's optimizer (AdamW, weight decay off for embeddings and
  norms by name) updates the model part exactly as it updates the model alone, and its state is
  nested like the params, so on an fsdp x tensor mesh the Adam moments take the params' shardings."""
  from glmjax import sharding as shd
  from glmjax.trainer.optim import OptimizerConfig, make_optimizer
  from glmjax.trainer.step import TrainProgram
  opt_config = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.5, schedule="constant",
                               warmup_steps=0)
  optimizer, _ = make_optimizer(opt_config, 10)
  model = init_params(CONFIG, jax.random.PRNGKey(0))
  params = {"model": model, "head": reward.init_head(CONFIG, jax.random.PRNGKey(1))}
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  grads["head"] = jax.tree.map(np.zeros_like, grads["head"])  # same global norm as the model's alone
  wrapped = reward.wrap_optimizer(optimizer, train_base=True)
  updates, _ = wrapped.update(grads, wrapped.init(params), params)
  alone, _ = optimizer.update(grads["model"], optimizer.init(model), model)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), updates["model"], alone)
  # a zero gradient leaves the embedding alone (no decay), a matrix decays
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = wrapped.update(zero, wrapped.init(params), params)
  assert not np.any(np.asarray(updates["model"]["embed"]["embedding"]))
  assert np.all(np.asarray(updates["model"]["layers"]["attn"]["wq"]) != 0)

  from glmjax.sharding import MeshConfig
  program = TrainProgram(CONFIG, opt_config, MeshConfig(data=1, fsdp=4, tensor=2), num_steps=10,
                         global_batch_size=8, tuning=reward.RewardTuning(CONFIG, reward.RewardConfig(task="x")))
  opt_shardings = program.state_shardings["opt_state"]
  mu = [s for s in jax.tree.leaves(opt_shardings, is_leaf=lambda x: isinstance(x, dict) and "model" in x)
        if isinstance(s, dict)]
  assert mu, "no nested params tree in the optimizer state"
  want = shd.param_shardings(CONFIG, program.mesh, program.rules)["layers"]["attn"]["wq"]
  assert want.spec != jax.sharding.PartitionSpec()
  assert all(m["model"]["layers"]["attn"]["wq"] == want for m in mu)


def test_reward_config_refuses_bad_combinations():
  from glmjax.trainer import loop
  from glmjax.tuning.dpo import DpoConfig
  with pytest.raises(ValueError, match="RewardConfig.style"):
    reward.validate(reward.RewardConfig(task="x", style="chat"))
  with pytest.raises(ValueError, match="LoraConfig.base_checkpoint"):
    reward.RewardTuning(CONFIG, reward.RewardConfig(task="x", base_checkpoint="runs/base"),
                        lora_lib.LoraTuning(CONFIG, LoraConfig(rank=2)))
  experiment = loop.Experiment(model=CONFIG, reward=reward.RewardConfig(task="x"), dpo=DpoConfig(task="y"))
  with pytest.raises(ValueError, match="RewardConfig.task goes with LoRA"):
    loop._tuning(experiment, seqio_data=False)  # pylint: disable=protected-access


def _reward_program(lora):
  from glmjax.sharding import MeshConfig
  from glmjax.trainer.optim import OptimizerConfig
  from glmjax.trainer.step import TrainProgram
  tuning = reward.RewardTuning(CONFIG, reward.RewardConfig(task="x"), lora_lib.LoraTuning(CONFIG, lora))
  program = TrainProgram(CONFIG, OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                                 weight_decay=0.0),
                         MeshConfig(data=-1), num_steps=10, global_batch_size=8, devices=jax.devices()[:1],
                         tuning=tuning)
  return program, reward.RewardProgram(program)


def test_reward_step_with_lora_dropout_draws_masks_from_the_state_rng():
  """LoraConfig.dropout reaches the reward step: its loss is not the no-dropout objective's, and
  it is the objective on lora.dropout_view(params, fold_in(rng, step)), the LM step's masks."""
  program, steps = _reward_program(LoraConfig(rank=4, alpha=8.0, targets=("all",), dropout=0.5))
  state = program.init_state(0)
  state["params"]["model"] = jax.tree.map(  # non-zero B so the adapters (and their dropout) matter
      lambda x: lora_lib.LoraWeight(x.base, x.a, 0.3 * jax.random.normal(jax.random.PRNGKey(3), x.b.shape),
                                    x.scale, x.in_ndim) if lora_lib.is_lora(x) else x,
      state["params"]["model"], is_leaf=lora_lib.is_lora)
  batch = pair_batch(4, seed=2)
  params, key = jax.device_get(state["params"]), jax.random.fold_in(state["rng"], state["step"])
  plain = float(reward.objective(params, batch, CONFIG)[0])
  dropped = {**params, "model": lora_lib.dropout_view(params["model"], key, 0.5)}
  want = float(reward.objective(dropped, batch, CONFIG)[0])
  _, metrics = steps.train_step(state, batch)
  assert abs(want - plain) > 1e-4
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)


def test_reward_step_on_a_qlora_base_keeps_it_quantized():
  from glmjax.tuning import quant
  program, steps = _reward_program(LoraConfig(rank=4, alpha=8.0, targets=("all",), quantize="nf4"))
  state = program.init_state(0)
  codes = np.asarray(state["params"]["model"]["layers"]["attn"]["wq"].base.codes)
  head = np.asarray(state["params"]["head"]["kernel"])
  batch = pair_batch(4, seed=3)
  losses = []
  for _ in range(3):
    state, metrics = steps.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  wq = state["params"]["model"]["layers"]["attn"]["wq"]
  assert quant.is_quantized(wq.base) and all(np.isfinite(losses)) and losses[-1] < losses[0]
  np.testing.assert_array_equal(np.asarray(wq.base.codes), codes)
  assert np.any(np.asarray(wq.b) != 0) and np.any(np.asarray(state["params"]["head"]["kernel"]) != head)
