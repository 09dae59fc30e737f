"""Scanned + rematerialised layers against an unrolled loop; bf16 against f32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward, transformer
from tests.model.helpers import as_jnp, glm_batch, perturbed_params, tiny


def _unrolled_forward(params, batch, config):
  """Python loop over layers, no scan, no jax.checkpoint."""
  batch = transformer.default_fields(batch)
  ctx = transformer.position_context(batch, config)
  x = transformer.embed(params, batch, config)
  for i in range(config.num_layers):
    layer = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    x, _ = transformer.block(layer, x, ctx, config)
  return transformer.logits_from_hidden(params, x, config)


def _loss(logits, batch):
  logp = jax.nn.log_softmax(logits)
  tgt = jnp.roll(batch["tokens"], -1, axis=1)
  return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "dots_and_attention_saveable", "none"])
def test_scan_remat_equals_unrolled_loop(policy):
  config = tiny("tiny-chatglm", num_layers=3, remat_policy=policy)
  params = perturbed_params(config)
  batch = as_jnp(glm_batch(config.vocab_size))
  scanned = lambda p: _loss(forward(p, batch, config), batch)  # noqa: E731
  unrolled = lambda p: _loss(_unrolled_forward(p, batch, config), batch)  # noqa: E731
  (l1, g1), (l2, g2) = jax.value_and_grad(scanned)(params), jax.value_and_grad(unrolled)(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-glm130b", "tiny-bloom"])
def test_bf16_compute_close_to_f32(name):
  config = tiny(name)
  params = perturbed_params(config)
  batch = as_jnp(glm_batch(config.vocab_size))
  f32 = forward(params, batch, config)
  bf16 = forward(params, batch, dataclasses.replace(config, dtype="bfloat16"))
  assert bf16.dtype == jnp.float32, "logits stay float32 under bf16 compute"
  valid = np.asarray(batch["segment_ids"]) != 0
  err = np.abs(np.asarray(bf16) - np.asarray(f32))[valid]
  scale = np.abs(np.asarray(f32))[valid].max()
  assert err.max() < 0.05 * scale + 0.05
  assert err.max() > 0, "bf16 compute must actually change the arithmetic"


def test_bf16_params():
  config = tiny("tiny-llama", param_dtype="bfloat16", dtype="bfloat16")
  params = perturbed_params(config)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  logits = forward(params, as_jnp(glm_batch(config.vocab_size)), config)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_compile_does_not_unroll_layers():
  """The jaxpr of a 16-layer model holds one layer body, like the 2-layer one."""
  def eqn_count(layers_):
    config = tiny("tiny-llama", num_layers=layers_)
    params = jax.eval_shape(lambda: perturbed_params(config))
    batch = as_jnp(glm_batch(config.vocab_size))
    return str(jax.make_jaxpr(lambda p: forward(p, batch, config))(params)).count("\n")
  assert eqn_count(16) == eqn_count(2)
