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
