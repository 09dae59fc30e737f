"""Mask semantics of the packed GLM batch, observed through the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward
from tests.model.helpers import as_jnp, glm_batch, perturbed_params, tiny

MODELS = ["tiny-glm", "tiny-chatglm", "tiny-llama", "tiny-bloom"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
  config = tiny(request.param)
  params = perturbed_params(config)
  run = jax.jit(lambda p, b: forward(p, b, config))
  return config, params, run


def _changed_rows(model, row, col):
  config, params, run = model
  batch = glm_batch(config.vocab_size)
  base = np.asarray(run(params, as_jnp(batch)))
  edited = {k: v.copy() for k, v in batch.items()}
  edited["tokens"][row, col] = (edited["tokens"][row, col] % (config.vocab_size - 1)) + 1
  assert edited["tokens"][row, col] != batch["tokens"][row, col]
  new = np.asarray(run(params, as_jnp(edited)))
  diff = np.abs(new - base).max(axis=-1)  # [B, L]
  return diff > 1e-6


def test_part_b_token_does_not_change_earlier_part_b_rows(model):
  changed = _changed_rows(model, row=0, col=7)  # third Part-B token of segment 1
  assert not changed[0, :7].any(), "Part A and earlier Part-B rows must not see a later Part-B token"
  assert changed[0, 7:9].all(), "the token's own and later Part-B rows see it"
  assert not changed[0, 9:].any() and not changed[1].any()


def test_part_a_token_changes_every_row_of_its_segment(model):
  changed = _changed_rows(model, row=0, col=3)  # Part A, bidirectional
  assert changed[0, :9].all()
  assert not changed[0, 9:].any(), "other segments and padding must not see it"


def test_other_segment_is_inert(model):
  changed = _changed_rows(model, row=0, col=10)  # causal segment 2
  assert not changed[0, :10].any()
  assert changed[0, 10:13].all()


def test_padding_is_inert(model):
  changed = _changed_rows(model, row=0, col=14)
  assert not changed[0, :14].any()


def test_bidirectional_segment_sees_later_tokens(model):
  changed = _changed_rows(model, row=1, col=15)  # last token of a bidirectional segment
  assert changed[1, 10:].all() and not changed[1, :10].any()


def test_causal_rows_by_index_not_by_positions():
  """Part B rows share one position id; causality must still follow the row index."""
  config = tiny("tiny-chatglm2")
  params = perturbed_params(config)
  batch = glm_batch(config.vocab_size)
  base = forward(params, as_jnp(batch), config)
  edited = {k: v.copy() for k, v in batch.items()}
  edited["tokens"][0, 8] = (edited["tokens"][0, 8] + 1) % config.vocab_size
  new = forward(params, as_jnp(edited), config)
  assert jnp.allclose(base[0, :8], new[0, :8])
