"""attention_impl="dense" (the train step's fast CPU path) against the reference attention:
values and gradients under packing, GLM bidirectional prefixes, GQA / MQA and ALiBi, and a
whole model's loss gradient with either implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward, init_params, presets
from glmjax.pallas.dense import dense_attention
from glmjax.pallas import attention_reference
from glmjax.trainer.loss import token_loss_sums
from tests.train.helpers import random_batches

B, L, D = 2, 24, 8


def inputs(heads, kv_heads, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, L, heads, D)).astype(np.float32)
  k = rng.normal(size=(B, L, kv_heads, D)).astype(np.float32)
  v = rng.normal(size=(B, L, kv_heads, D)).astype(np.float32)
  # Packed rows: segments 1..3 then padding (0); a bidirectional prefix in each segment.
  segment_ids = np.array([[1] * 8 + [2] * 10 + [3] * 4 + [0] * 2, [1] * 20 + [0] * 4])
  bidirectional = np.zeros((B, L), np.int32)
  bidirectional[0, :3] = bidirectional[0, 8:12] = bidirectional[1, :6] = 1
  return [jnp.asarray(a) for a in (q, k, v)], jnp.asarray(segment_ids), jnp.asarray(bidirectional)


@pytest.mark.parametrize("heads, kv_heads, alibi", [(4, 4, False), (4, 2, False), (4, 1, True), (6, 3, True)],
                         ids=["mha", "gqa", "mqa_alibi", "gqa_alibi"])
def test_values_and_gradients_match_the_reference(heads, kv_heads, alibi):
  (q, k, v), seg, bidi = inputs(heads, kv_heads)
  slopes = jnp.linspace(0.05, 0.5, heads) if alibi else None
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, heads, D)).astype(np.float32))

  def objective(impl):
    def f(q, k, v, slopes):
      return jnp.sum(impl(q, k, v, segment_ids=seg, bidirectional=bidi, alibi_slopes=slopes) * weights)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3) if alibi else (0, 1, 2)))

  want_value, want_grads = objective(attention_reference)(q, k, v, slopes)
  got_value, got_grads = objective(dense_attention)(q, k, v, slopes)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  out = dense_attention(q, k, v, segment_ids=seg, bidirectional=bidi, alibi_slopes=slopes)
  np.testing.assert_array_equal(out[0, -2:], 0.0)  # padding rows see no key


def test_model_gradients_match_with_either_implementation():
  base = dataclasses.replace(presets.get("tiny-glm"), attention_impl="xla")
  params = init_params(base, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in random_batches(1, 2, 16, seed=3, vocab=base.vocab_size)[0].items()}
  batch["block_positions"] = jnp.zeros_like(batch["tokens"])
  batch["bidirectional"] = (jnp.arange(16)[None, :] < 5).astype(jnp.int32) * jnp.ones((2, 1), jnp.int32)

  def loss(p, config):
    sums = token_loss_sums(forward(p, batch, config), batch["targets"], batch["loss_mask"])
    return sums["nll_sum"] / sums["weight_sum"]

  want = jax.value_and_grad(loss)(params, base)
  got = jax.value_and_grad(loss)(params, dataclasses.replace(base, attention_impl="dense"))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got[1])[0], jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def causal_inputs(heads, kv_heads, seed=0):
  """Packed causal rows (no bidirectional token): every query block only sees earlier keys."""
  (q, k, v), seg, _ = inputs(heads, kv_heads, seed)
  return (q, k, v), seg, jnp.zeros_like(seg)


def crossing_inputs(heads, kv_heads, seed=0):
  """inputs() with row 1's bidirectional prefix widened to 0..13: it crosses the block
  boundaries at 6, 8 and 12, so early queries see keys of later blocks."""
  (q, k, v), seg, bidi = inputs(heads, kv_heads, seed)
  return (q, k, v), seg, bidi.at[1, :14].set(1)


@pytest.mark.parametrize("blocks", [2, 3, 4])
@pytest.mark.parametrize("case", ["causal", "glm_prefix"])
def test_causal_block_skipping_matches_the_reference(blocks, case):
  (q, k, v), seg, bidi = (causal_inputs if case == "causal" else crossing_inputs)(4, 2)
  slopes = jnp.linspace(0.05, 0.5, 4)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(B, L, 4, D)).astype(np.float32))
  # The causal batch takes the blocked branch; the GLM one (a bidirectional prefix across the
  # block boundaries) the full one.
  from glmjax.pallas.dense import reaches_a_later_block
  assert bool(reaches_a_later_block(seg, bidi, blocks)) == (case == "glm_prefix")

  def objective(impl, **kw):
    def f(q, k, v, slopes):
      return jnp.sum(impl(q, k, v, segment_ids=seg, bidirectional=bidi, alibi_slopes=slopes, **kw) * weights)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

  want_value, want_grads = objective(attention_reference)(q, k, v, slopes)
  got_value, got_grads = objective(dense_attention, blocks=blocks)(q, k, v, slopes)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_blocked_form_alone_would_drop_keys_the_glm_batch_sees():
  """The cond is needed: forcing the blocked form on a batch whose prefix crosses a block
  boundary gives other numbers (so the branch test above is not vacuous)."""
  from glmjax.pallas import dense
  (q, k, v), seg, bidi = crossing_inputs(4, 2)
  kh, vh = dense._heads_major(k, 1), dense._heads_major(v, 1)
  scale = 1.0 / np.sqrt(D)
  half = L // 2
  second_half = dense._attention(dense._heads_major(q[:, half:], 2), kh, vh, seg[:, half:], seg, bidi, None,
                                 scale, 2, half)
  first_half_blocked = dense._attention(dense._heads_major(q[:, :half], 2), kh[:, :, :half], vh[:, :, :half],
                                        seg[:, :half], seg[:, :half], bidi[:, :half], None, scale, 2, 0)
  blocked = jnp.concatenate([dense._tokens_major(first_half_blocked, 2, half),
                             dense._tokens_major(second_half, 2, L - half)], axis=1)
  want = attention_reference(q, k, v, segment_ids=seg, bidirectional=bidi)
  assert float(jnp.max(jnp.abs(blocked - want))) > 1e-3
  np.testing.assert_allclose(dense_attention(q, k, v, segment_ids=seg, bidirectional=bidi, blocks=2), want,
                             rtol=1e-5, atol=1e-6)


def test_default_blocks_follow_the_length():
  from glmjax.pallas.dense import causal_blocks
  assert causal_blocks(24) == 1 and causal_blocks(512) == 4 and causal_blocks(4096) == 8
  assert causal_blocks(509) == 1 and causal_blocks(384) == 3  # 509 is prime
