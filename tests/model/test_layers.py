"""Norms, FFN variants, embedding gradient shrink, DeepNorm init, mixture of experts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model import forward_with_aux, init_params, layers, param_specs
from tests.model.helpers import as_jnp, glm_batch, perturbed_params, tiny


def test_layer_norm_and_rms_norm_formulas():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  scale, bias = np.linspace(0.5, 2, 8).astype(np.float32), np.linspace(-1, 1, 8).astype(np.float32)
  ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
  rms = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(layers.layer_norm(x, scale, bias, 1e-5), ln, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers.rms_norm(x, scale, 1e-6), rms, rtol=1e-5, atol=1e-6)


def test_embedding_gradient_shrink():
  config = tiny("tiny-glm130b")
  assert config.embed_grad_scale == 0.1
  plain = dataclasses.replace(config, embed_grad_scale=1.0)
  params = perturbed_params(config)
  batch = as_jnp(glm_batch(config.vocab_size))

  def loss(p, c):
    return jnp.sum(forward_with_aux(p, batch, c)[0] ** 2)

  np.testing.assert_array_equal(loss(params, config), loss(params, plain))
  g_shrunk, g_plain = jax.grad(loss)(params, config), jax.grad(loss)(params, plain)
  np.testing.assert_allclose(g_shrunk["layers"]["attn"]["wq"], g_plain["layers"]["attn"]["wq"], rtol=1e-4, atol=1e-5)
  # Tied embeddings: the head's gradient is untouched, the input-embedding part is scaled by 0.1.
  head_only = jax.grad(lambda p: loss(p, dataclasses.replace(config, embed_grad_scale=1e-30)))(params)
  want = head_only["embed"]["embedding"] + 0.1 * (g_plain["embed"]["embedding"] - head_only["embed"]["embedding"])
  np.testing.assert_allclose(g_shrunk["embed"]["embedding"], want, rtol=1e-4, atol=1e-5)


def test_deepnorm_init_scales():
  config = tiny("tiny-glm130b", d_model=256, num_heads=8, num_kv_heads=8, head_dim=32, ffn_dim=512,
                num_layers=8)
  params = init_params(config, jax.random.key(0))
  beta = (2 * 8) ** -0.5
  xavier = lambda fan_in, fan_out, gain: gain * math.sqrt(2.0 / (fan_in + fan_out))  # noqa: E731
  attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
  for arr, want in [(attn["wq"], xavier(256, 256, 1.0)), (attn["wv"], xavier(256, 256, beta)),
                    (attn["wo"], xavier(256, 256, beta)), (mlp["w_up"], xavier(256, 512, beta)),
                    (mlp["w_down"], xavier(512, 256, beta))]:
    assert abs(float(jnp.std(arr)) / want - 1) < 0.05


def test_param_specs_logical_axes_match_shapes():
  for name in ("tiny-moe", "tiny-chatglm2", "tiny-bloom", "tiny-glm"):
    specs = param_specs(tiny(name))
    for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda s: hasattr(s, "axes")):
      assert len(spec.axes) == len(spec.shape)


def _moe_reference(x_TD, router, w_gate, w_up, w_down, valid, top_k, capacity):
  """Per-token loop: token t goes to its top-k experts in order unless the expert is full."""
  probs = jax.nn.softmax(x_TD @ router, axis=-1)
  order = np.argsort(-np.asarray(probs), axis=-1)[:, :top_k]
  load = np.zeros(router.shape[1], int)
  out = np.zeros(x_TD.shape)
  for rank in range(top_k):
    for t in range(x_TD.shape[0]):
      if not valid[t]:
        continue
      e = order[t, rank]
      if load[e] < capacity:
        load[e] += 1
        h = jax.nn.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])
        out[t] += float(probs[t, e]) * np.asarray(h @ w_down[e])
  return out


@pytest.mark.parametrize("capacity_factor", [2.0, 0.5])
def test_moe_matches_per_token_reference(capacity_factor):
  config = tiny("tiny-moe", expert_capacity_factor=capacity_factor)
  params = perturbed_params(config)
  p = jax.tree_util.tree_map(lambda a: a[0], params["layers"]["mlp"])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, config.d_model)), jnp.float32)
  valid = np.ones((2, 8), bool)
  valid[1, 6:] = False
  out, aux = layers.moe_ffn(p, x, jnp.asarray(valid), activation="silu", gated=True,
                            top_k=2, capacity_factor=capacity_factor, dtype=jnp.float32)
  capacity = max(1, math.ceil(2 * 16 / 4 * capacity_factor))
  want = _moe_reference(np.asarray(x).reshape(16, -1), p["router"], p["w_gate"], p["w_up"],
                        p["w_down"], valid.reshape(-1), 2, capacity)
  np.testing.assert_allclose(np.asarray(out).reshape(16, -1), want, atol=1e-5)
  assert float(aux) >= 1.0 - 1e-5  # E * sum f_e P_e >= 1 ... equality only if balanced


def test_moe_model_returns_aux_loss_and_trains():
  config = tiny("tiny-moe")
  params = perturbed_params(config)
  batch = as_jnp(glm_batch(config.vocab_size))
  logits, aux = forward_with_aux(params, batch, config)
  assert logits.shape == (2, 16, config.vocab_size) and float(aux["moe_aux_loss"]) > 0
  grads = jax.grad(lambda p: forward_with_aux(p, batch, config)[1]["moe_aux_loss"])(params)
  assert float(jnp.abs(grads["layers"]["mlp"]["router"]).sum()) > 0
