"""Loss sums against numpy; schedules against their formulas; the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glmjax.model import init_params, presets
from glmjax.trainer import OptimizerConfig, make_optimizer
from glmjax.trainer import optim
from glmjax.trainer.loss import token_loss_sums


def test_token_loss_sums_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  got = jax.device_get(token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got["nll_sum"], (nll * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(got["z_sum"], (log_z**2 * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(got["correct_sum"], (_first_max_hits(logits, targets) * mask).sum())
  np.testing.assert_allclose(got["weight_sum"], mask.sum())


def _first_max_hits(logits, targets):
  """Plain formula of token accuracy: the target is the lowest id holding the row maximum."""
  rows = logits.reshape(-1, logits.shape[-1])
  first = np.array([min(np.flatnonzero(row == row.max())) for row in rows])
  return first.reshape(targets.shape) == targets


def test_accuracy_counts_a_target_tied_with_a_lower_id_as_wrong():
  """Ties go to the first maximum (argmax), as glmjax.evaluate reports accuracy."""
  rng = np.random.default_rng(2)
  logits = rng.integers(0, 3, size=(3, 8, 5)).astype(np.float32)  # many tied maxima
  targets = rng.integers(0, 5, (3, 8))
  mask = (rng.random((3, 8)) > 0.2).astype(np.float32)
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  hits = _first_max_hits(logits, targets)
  assert ((target_logit == logits.max(-1)) & ~hits & (mask > 0)).any()
  got = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got["correct_sum"]), (hits * mask).sum())


def test_accuracy_on_rows_of_equal_logits_and_all_minus_inf():
  """Every id tied (a zero head at init) and an all -inf row: only target 0 is the first maximum."""
  logits = np.zeros((2, 4, 6), np.float32)
  logits[1, :2] = -np.inf
  targets = np.array([[0, 3, 5, 0], [0, 2, 0, 1]])
  hits = _first_max_hits(logits, targets)
  assert hits.sum() == 4
  got = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.ones((2, 4), jnp.float32))
  assert float(got["correct_sum"]) == hits.sum()


def test_accuracy_with_ties_that_cannot_move_the_answer():
  """Tied maxima where `target_logit == row max` alone gives the answer (the target is id 0, or
  is not at the maximum at all) and a batch with no tie: the same hits as the plain formula."""
  logits = np.array([[[2.0, 2.0, 1.0, 0.0], [1.0, 3.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]]], np.float32)
  targets = np.array([[0, 0, 3]])  # row 0: target 0 tied (a hit); row 1: ids 1 and 2 tied, target
  hits = _first_max_hits(logits, targets)  # 0 off the max (a miss); row 2: no tie (a hit)
  assert hits.tolist() == [[True, False, True]]
  got = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.ones((1, 3), jnp.float32))
  assert float(got["correct_sum"]) == 2
  untied = np.random.default_rng(3).permutation(40).reshape(2, 4, 5).astype(np.float32)
  untied_targets = np.argmax(untied, -1)
  untied_targets[0] = 0
  got = token_loss_sums(jnp.asarray(untied), jnp.asarray(untied_targets), jnp.ones((2, 4), jnp.float32))
  assert float(got["correct_sum"]) == _first_max_hits(untied, untied_targets).sum()


def test_loss_gradient_matches_autodiff_of_the_plain_formula():
  """The closed-form backward equals jax.grad of logsumexp - take_along_axis (with z-loss)."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)).astype(np.float32) * 2)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
  mask = jnp.asarray((rng.random((2, 5)) > 0.3).astype(np.float32))

  def ours(x):
    s = token_loss_sums(x, targets, mask)
    return s["nll_sum"] + 1e-2 * s["z_sum"]

  def plain(x):
    log_z = jax.nn.logsumexp(x, axis=-1)
    nll = log_z - jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) + 1e-2 * jnp.sum(log_z**2 * mask)

  np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(plain)(logits), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits), jax.grad(plain)(logits), rtol=1e-5, atol=1e-7)


def test_warmup_cosine_to_a_ten_percent_floor():
  """LLaMA: linear warmup, cosine decay to 10% of the peak."""
  config = OptimizerConfig(learning_rate=3e-4, schedule="warmup_cosine", warmup_steps=2000,
                           final_lr_ratio=0.1)
  schedule = optim.learning_rate_schedule(config, num_steps=100_000)
  floor = 3e-5
  for step, want in [(0, 0.0), (1000, 1.5e-4), (2000, 3e-4), (100_000, floor), (150_000, floor)]:
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-12)
  mid = 2000 + (100_000 - 2000) // 2
  np.testing.assert_allclose(float(schedule(mid)), floor + (3e-4 - floor) * 0.5 * (1 + math.cos(math.pi / 2)),
                             rtol=1e-4)


def test_linear_constant_and_rsqrt_schedules():
  lin = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear", warmup_steps=10,
                                                     final_lr_ratio=0.0), num_steps=110)
  assert [round(float(lin(s)), 6) for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 0.5, 0.0]
  const = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, schedule="constant"), 10)
  assert float(const(0)) == pytest.approx(1e-3) and float(const(10**6)) == pytest.approx(1e-3)
  rsqrt = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1e-2, schedule="rsqrt", warmup_steps=100), 10)
  np.testing.assert_allclose([float(rsqrt(s)) for s in (50, 100, 400)], [5e-3, 1e-2, 5e-3], rtol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = jax.eval_shape(lambda k: init_params(presets.get("tiny-glm"), k), jax.random.PRNGKey(0))
  mask = optim.weight_decay_mask(params, OptimizerConfig())
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted(f"['layers']['{sub}']['{name}']" for sub, name in [
      ("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("mlp", "w_up"), ("mlp", "w_down")])
  with_embed = optim.weight_decay_mask(params, OptimizerConfig(decay_embeddings=True))
  assert with_embed["embed"]["embedding"] and with_embed["embed"]["position"]
  assert not with_embed["layers"]["attn_norm"]["scale"]


def test_adamw_decays_only_masked_params():
  """With zero gradients AdamW's update is -lr * wd * param on decayed leaves, 0 elsewhere."""
  params = {"layers": {"attn": {"wq": jnp.full((2, 2), 2.0), "bq": jnp.full((2,), 2.0)},
                       "attn_norm": {"scale": jnp.full((2,), 2.0)}}, "embed": {"embedding": jnp.full((3, 2), 2.0)}}
  opt, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5,
                                          grad_clip_norm=0.0), num_steps=1)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  np.testing.assert_allclose(updates["layers"]["attn"]["wq"], -0.1 * 0.5 * 2.0)
  for leaf in (updates["layers"]["attn"]["bq"], updates["layers"]["attn_norm"]["scale"],
               updates["embed"]["embedding"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_global_norm_clipping_comes_first():
  """Adam's first moment after one step is (1 - b1) * the clipped gradient."""
  params = {"w": jnp.zeros((4,))}
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # global norm 5
  opt, _ = make_optimizer(OptimizerConfig(learning_rate=1.0, schedule="constant", weight_decay=0.0,
                                          grad_clip_norm=1.0, b1=0.9), num_steps=1)
  _, state = opt.update(grads, opt.init(params), params)
  mus = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
         if "mu" in jax.tree_util.keystr(path)]
  assert len(mus) == 1
  np.testing.assert_allclose(mus[0], 0.1 * np.array([0.6, 0.8, 0.0, 0.0]), rtol=1e-6)


def test_adafactor_flan_recipe_trains_a_quadratic():
  opt, _ = make_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-1, schedule="constant",
                                          weight_decay=0.0, grad_clip_norm=0.0), num_steps=1)
  params = {"w": jnp.full((4, 3), 3.0)}
  state = opt.init(params)
  for _ in range(50):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.abs(params["w"]).max()) < 1.0


@pytest.mark.parametrize("field, value, needle", [
    ("name", "sgdd", "OptimizerConfig.name='sgdd'"),
    ("schedule", "cosine", "OptimizerConfig.schedule='cosine'"),
    ("learning_rate", 0.0, "learning_rate=0.0 must be > 0"),
])
def test_bad_optimizer_config_fails_clearly(field, value, needle):
  with pytest.raises(ValueError, match=needle):
    make_optimizer(OptimizerConfig(**{field: value}), num_steps=10)
