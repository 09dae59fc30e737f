"""GQA / MQA against MHA with repeated kv weights; the attention reference against a loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import pallas
from glmjax.model import forward
from tests.model.helpers import as_jnp, glm_batch, perturbed_params, tiny


def _as_mha(params, config):
  """The MHA model with the same function: every kv head repeated for its query group."""
  group = config.num_heads // config.num_kv_heads
  attn = dict(params["layers"]["attn"])
  for name in ("wk", "wv", "bk", "bv"):
    if name in attn:
      attn[name] = jnp.repeat(attn[name], group, axis=attn[name].ndim - 2)
  layers_ = dict(params["layers"], attn=attn)
  return dict(params, layers=layers_), dataclasses.replace(config, num_kv_heads=config.num_heads)


@pytest.mark.parametrize("name,kv_heads", [("tiny-llama", 2), ("tiny-chatglm2", 2),
                                           ("tiny-palm", 1), ("tiny-llama", 1)])
def test_grouped_kv_equals_mha_with_repeated_weights(name, kv_heads):
  config = tiny(name, num_kv_heads=kv_heads)
  params = perturbed_params(config)
  batch = as_jnp(glm_batch(config.vocab_size))
  mha_params, mha_config = _as_mha(params, config)
  np.testing.assert_allclose(forward(params, batch, config), forward(mha_params, batch, mha_config),
                             atol=1e-5)


def test_kv_heads_equal_heads_is_mha():
  config = tiny("tiny-llama", num_kv_heads=4)
  params = perturbed_params(config)
  assert params["layers"]["attn"]["wk"].shape == params["layers"]["attn"]["wq"].shape
  mha_params, _ = _as_mha(params, config)
  batch = as_jnp(glm_batch(config.vocab_size))
  np.testing.assert_array_equal(forward(params, batch, config), forward(mha_params, batch, config))


def _loop_attention(q, k, v, seg, bidi, slopes):
  b, l, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros(q.shape)
  for bi in range(b):
    for hi in range(h):
      for i in range(l):
        vis = [j for j in range(l) if seg[bi, i] == seg[bi, j] != 0 and (j <= i or bidi[bi, j])]
        if not vis:
          continue
        s = np.array([q[bi, i, hi] @ k[bi, j, hi // group] / np.sqrt(d)
                      + (0 if slopes is None else slopes[hi] * (j - i)) for j in vis])
        w = np.exp(s - s.max())
        out[bi, i, hi] = (w / w.sum()) @ v[bi, vis, hi // group]
  return out


@pytest.mark.parametrize("kv_heads,alibi", [(4, False), (2, True), (1, False)])
def test_attention_reference_matches_loop(kv_heads, alibi):
  rng = np.random.default_rng(kv_heads)
  q = rng.normal(size=(2, 16, 4, 8))
  k = rng.normal(size=(2, 16, kv_heads, 8))
  v = rng.normal(size=(2, 16, kv_heads, 8))
  batch = glm_batch(64)
  slopes = np.array([0.5, 0.25, 0.125, 0.0625]) if alibi else None
  got = pallas.attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                         jnp.asarray(v, jnp.float32), segment_ids=batch["segment_ids"],
                         bidirectional=batch["bidirectional"],
                         alibi_slopes=None if slopes is None else jnp.asarray(slopes), impl="xla")
  want = _loop_attention(q, k, v, batch["segment_ids"], batch["bidirectional"], slopes)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  assert np.all(np.asarray(got)[0, 13:] == 0), "padding rows must be exactly zero"
