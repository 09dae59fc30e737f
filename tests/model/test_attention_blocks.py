"""The dense attention's causal block skipping inside the model: its run-time test is taken once
per batch (PositionContext.reaches_later_block) and skipped when the batch has no
`bidirectional` field; either way the logits and, under the CPU default remat
("dots_and_attention_saveable", which saves the attention's output and log-sum-exp), the
gradients equal those of the model on the plain reference attention (attention_impl="xla":
glmjax.pallas.attention_reference, the packing + GLM mask materialised, autodiff) without
remat. (tests/model/test_forward_reference.py ties that model to the NumPy reference; at
this length the NumPy loops would take minutes.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward, transformer
from glmjax.pallas import dense
from tests.model.helpers import perturbed_params, tiny

LENGTH = 256  # dense.causal_blocks(256) == 2 query blocks
CONFIG = tiny("tiny-llama", max_length=LENGTH)
REFERENCE = tiny("tiny-llama", max_length=LENGTH, attention_impl="xla", remat_policy="none")


def tokens_only(seed=0):
  return {"tokens": np.random.default_rng(seed).integers(1, CONFIG.vocab_size, (2, LENGTH)).astype(np.int32)}


def glm_prefix_batch():
  """Row 0: a bidirectional prefix of 200 tokens (it crosses the block boundary at 128), then
  causal text; row 1: plain causal."""
  batch = dict(tokens_only(1))
  bidi = np.zeros((2, LENGTH), np.int32)
  bidi[0, :200] = 1
  batch.update(segment_ids=np.ones((2, LENGTH), np.int32),
               positions=np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (2, LENGTH)).copy(),
               block_positions=np.zeros((2, LENGTH), np.int32), bidirectional=bidi)
  return batch


def test_the_block_count_under_test():
  assert dense.causal_blocks(LENGTH) == 2


def test_position_context_tests_the_batch_once():
  glm = transformer.default_fields({k: jnp.asarray(v) for k, v in glm_prefix_batch().items()})
  causal = transformer.default_fields({"tokens": jnp.asarray(tokens_only()["tokens"])})
  assert bool(transformer.position_context(glm, CONFIG).reaches_later_block)
  assert not bool(transformer.position_context(causal, CONFIG).reaches_later_block)
  assert transformer.position_context(causal, CONFIG, bidirectional_given=False).reaches_later_block is None


def batch_of(case):
  batch = glm_prefix_batch() if case == "glm_prefix" else tokens_only()
  if case == "causal_given":  # every optional field present, bidirectional all zeros
    batch = transformer.default_fields(batch)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def loss(params, batch, config):
  logits = forward(params, batch, config)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits


@pytest.mark.parametrize("case", ["tokens_only", "causal_given", "glm_prefix"])
def test_logits_and_gradients_match_the_reference_attention(case):
  params, batch = perturbed_params(CONFIG), batch_of(case)
  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
  (_, got_logits), got = step(params, batch, CONFIG)
  (_, want_logits), want = step(params, batch, REFERENCE)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_no_run_time_test_without_a_bidirectional_field():
  # attention_impl="dense" (what "auto" runs on CPU) without "auto"'s platform_dependent switch,
  # itself a cond in the jaxpr
  config = tiny("tiny-llama", max_length=LENGTH, attention_impl="dense")
  params = perturbed_params(config)
  batch = {"tokens": jnp.asarray(tokens_only()["tokens"])}
  without = str(jax.make_jaxpr(lambda p: forward(p, batch, config))(params))
  with_field = str(jax.make_jaxpr(lambda p: forward(p, transformer.default_fields(batch), config))(params))
  assert "cond[" not in without
  assert "cond[" in with_field
