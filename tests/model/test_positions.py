"""Position schemes: RoPE relativity, 2D positions, ALiBi slopes, sinusoids."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward, layers
from tests.model.helpers import perturbed_params, tiny


def _alibi_formula(n):
  """Press et al.: geometric slopes from 2^(-8/n); for n not a power of two,
  the 2^floor(log2 n) sequence then every other slope of the 2x sequence."""
  def geometric(m):
    return [2 ** (-8 * (i + 1) / m) for i in range(m)]
  if math.log2(n).is_integer():
    return geometric(n)
  closest = 2 ** math.floor(math.log2(n))
  return geometric(closest) + geometric(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [8, 12, 80])
def test_alibi_slopes_match_formula(heads):
  np.testing.assert_allclose(np.asarray(layers.alibi_slopes(heads)), _alibi_formula(heads), rtol=1e-6)


def test_alibi_slopes_known_values():
  np.testing.assert_allclose(np.asarray(layers.alibi_slopes(8)), [1 / 2 ** i for i in range(1, 9)], rtol=1e-6)


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_scores_depend_only_on_relative_position(layout, fraction):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  rot = int(16 * fraction)

  def score(pq, pk):
    aq = layers.rope_angles(jnp.array([[pq]]), rot, 10000.0)
    ak = layers.rope_angles(jnp.array([[pk]]), rot, 10000.0)
    return float(jnp.sum(layers.apply_rope(q, aq, layout) * layers.apply_rope(k, ak, layout)))

  base = score(7, 3)
  for shift in (1, 5, 100, 1000):
    assert abs(score(7 + shift, 3 + shift) - base) < 1e-3
  assert abs(score(9, 3) - base) > 1e-3


def test_rope_preserves_norm_and_passes_unrotated_dims():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 8)), jnp.float32)
  angles = layers.rope_angles(jnp.array([[0, 4, 9]]), 4, 10000.0)
  y = layers.apply_rope(x, angles, "interleaved")
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0: identity


def _logits(config, params, tokens, positions, block_positions):
  batch = {"tokens": tokens, "positions": positions, "block_positions": block_positions,
           "segment_ids": jnp.ones_like(tokens), "bidirectional": jnp.zeros_like(tokens)}
  return forward(params, batch, config)


@pytest.mark.parametrize("name", ["tiny-chatglm", "tiny-glm"])
def test_2d_models_use_block_positions(name):
  config = tiny(name)
  params = perturbed_params(config)
  tokens = jnp.arange(1, 9, dtype=jnp.int32)[None]
  pos = jnp.zeros_like(tokens) + 2
  a = _logits(config, params, tokens, pos, jnp.zeros_like(tokens))
  b = _logits(config, params, tokens, pos, jnp.arange(8, dtype=jnp.int32)[None] + 1)
  assert float(jnp.abs(a - b).max()) > 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-chatglm2"])
def test_1d_models_ignore_block_positions(name):
  config = tiny(name)
  params = perturbed_params(config)
  tokens = jnp.arange(1, 9, dtype=jnp.int32)[None]
  pos = jnp.arange(8, dtype=jnp.int32)[None]
  a = _logits(config, params, tokens, pos, jnp.zeros_like(tokens))
  b = _logits(config, params, tokens, pos, pos + 1)
  np.testing.assert_array_equal(a, b)


def test_rope_model_is_shift_invariant():
  """A whole causal sequence at positions p+s gives the logits of positions p."""
  config = tiny("tiny-llama")
  params = perturbed_params(config)
  tokens = jnp.arange(1, 11, dtype=jnp.int32)[None]
  pos = jnp.arange(10, dtype=jnp.int32)[None]
  a = _logits(config, params, tokens, pos, jnp.zeros_like(tokens))
  b = _logits(config, params, tokens, pos + 37, jnp.zeros_like(tokens))
  np.testing.assert_allclose(a, b, atol=2e-5)


def test_sinusoidal_embedding_formula():
  got = np.asarray(layers.sinusoidal_embedding(jnp.array([[0, 3]]), 6))
  want = [[math.sin(3 / 10000 ** (i / 6)) if i % 2 == 0 else math.cos(3 / 10000 ** ((i - 1) / 6))
           for i in range(6)]]
  np.testing.assert_allclose(got[0, 1:], want, rtol=1e-5)
  np.testing.assert_allclose(got[0, 0], [0, 1, 0, 1, 0, 1], atol=1e-7)
