"""Context parallelism: context = 2 / 4 / 8 equals one device (logits and gradients to 1e-5 in
float32) on packed GLM batches whose segments and bidirectional prefixes straddle the shard
boundaries, with GQA, ALiBi and 2D RoPE; a training step on a context x data mesh equals the
one-device step; bad lengths are one line."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import pallas
from glmjax.model import ModelConfig, forward, init_params
from glmjax.pallas import ring
from glmjax.sharding import DEFAULT_RULES, MeshConfig, activation_sharding, make_mesh
from glmjax.trainer import OptimizerConfig, TrainProgram

LENGTH = 32
GLM = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  ffn_dim=48, max_length=LENGTH, position="rope_2d", attention_impl="xla")
ALIBI = dataclasses.replace(GLM, position="alibi", num_kv_heads=1, norm="rmsnorm", ffn="swiglu")


def packed_glm_batch(batch=2, length=LENGTH, seed=0):
  """Rows of packed GLM examples: Part A bidirectional, Part B causal, positions restarting per
  example, block positions 1.. in Part B, trailing padding (segment 0). Segment lengths are odd
  so both segments and bidirectional prefixes cross every chunk boundary of 2, 4, 8 devices."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch, length), np.int32) for k in
         ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")}
  out["loss_mask"] = np.zeros((batch, length), np.float32)
  for row, sizes in enumerate(([7, 11, 9, 3], [13, 5, 10])):
    start = 0
    for seg, size in enumerate(sizes, 1):
      part_a = (size + 1) // 2
      sl = slice(start, start + size)
      out["segment_ids"][row, sl] = seg
      out["bidirectional"][row, start:start + part_a] = 1
      out["positions"][row, sl] = np.minimum(np.arange(size), part_a)
      out["block_positions"][row, start + part_a:start + size] = np.arange(1, size - part_a + 1)
      out["loss_mask"][row, start + part_a:start + size] = 1.0
      start += size
  out["tokens"] = rng.integers(2, GLM.vocab_size, (batch, length)).astype(np.int32)
  out["targets"] = rng.integers(2, GLM.vocab_size, (batch, length)).astype(np.int32)
  out["tokens"] *= out["segment_ids"] != 0
  return out


def loss(params, batch, config):
  logits = forward(params, batch, config)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def logits_and_grads(config, params, batch, mesh=None):
  def run(params, batch):
    return forward(params, batch, config), jax.grad(loss)(params, batch, config)
  if mesh is None:
    return jax.device_get(jax.jit(run)(params, batch))
  with activation_sharding(mesh, DEFAULT_RULES):
    return jax.device_get(jax.jit(run)(params, batch))


@pytest.fixture(scope="module")
def references():
  batch = packed_glm_batch()
  out = {}
  for name, config in (("glm_rope2d_gqa", GLM), ("alibi_mqa", ALIBI)):
    params = init_params(config, jax.random.key(len(name)))
    out[name] = (config, params, logits_and_grads(config, params, batch))
  return batch, out


@pytest.mark.parametrize("name, context, impl", [
    ("glm_rope2d_gqa", 2, "xla"), ("glm_rope2d_gqa", 4, "xla"), ("glm_rope2d_gqa", 8, "xla"),
    ("alibi_mqa", 8, "xla"), ("glm_rope2d_gqa", 4, "pallas"), ("alibi_mqa", 2, "pallas")])
def test_context_parallel_forward_and_gradients_equal_one_device(references, name, context, impl):
  """impl="pallas": the ring's Pallas block kernel (interpret mode on CPU) in every layer."""
  batch, cases = references
  config, params, (want_logits, want_grads) = cases[name]
  config = dataclasses.replace(config, attention_impl=impl)
  mesh = make_mesh(MeshConfig(data=8 // context, context=context))
  got_logits, got_grads = logits_and_grads(config, params, batch, mesh)
  valid = batch["segment_ids"] != 0
  np.testing.assert_allclose(got_logits[valid], want_logits[valid], rtol=1e-5, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                               jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ["dense", "pallas"])
def test_ring_attention_equals_reference_with_gqa_alibi_and_slope_gradients(impl):
  """The attention op alone, every row (padding rows too), context=4 x tensor=2 (heads split);
  key tiles of 2 rows in the XLA blocks; impl="pallas" scores every block with the ring's Pallas
  kernel in interpret mode."""
  batch = packed_glm_batch()
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, LENGTH, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, LENGTH, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, LENGTH, 2, 8)), jnp.float32)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
  seg, bidi = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["bidirectional"])
  w = jnp.asarray(rng.standard_normal((2, LENGTH, 4, 8)), jnp.float32)

  def reference(q, k, v, slopes):
    out = pallas.attention_reference(q, k, v, segment_ids=seg, bidirectional=bidi, alibi_slopes=slopes)
    return jnp.sum(out * w), out

  def ringed(q, k, v, slopes):
    c = ring.context_size()
    z = lambda x: ring.to_zigzag(x, c)  # noqa: E731
    out = ring.from_zigzag(pallas.attention(z(q), z(k), z(v), segment_ids=z(seg), bidirectional=z(bidi),
                                            alibi_slopes=slopes, impl=impl, block_k=2), c)
    return jnp.sum(out * w), out

  want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, slopes)
  mesh = make_mesh(MeshConfig(data=1, context=4, tensor=2))
  with activation_sharding(mesh, DEFAULT_RULES):
    assert ring.context_size() == 4
    step = jax.jit(jax.value_and_grad(ringed, argnums=(0, 1, 2, 3), has_aux=True))
    got = step(q, k, v, slopes)
    jaxpr = str(jax.make_jaxpr(ringed)(q, k, v, slopes))
    assert ("glm_ring_block" in jaxpr) == (impl == "pallas")
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_zigzag_balances_causal_work():
  """Device r holds chunks r and 2c-1-r: the causally visible (query, key) pairs per device are equal."""
  c, length = 4, 64
  order = ring.zigzag_order(length, c)
  assert sorted(order) == list(range(length))
  rows = order.reshape(c, -1)
  visible = [(r[:, None] >= np.arange(length)[None]).sum() for r in rows]
  assert len(set(visible)) == 1, visible


def test_train_step_on_context_mesh_equals_one_device():
  optimizer = OptimizerConfig(learning_rate=3e-3, schedule="constant", grad_clip_norm=1.0)
  batch = packed_glm_batch(batch=4, seed=5)
  batch.update({k: np.concatenate([v, v[::-1]]) for k, v in batch.items()})  # 8 rows for data=2

  def one_step(mesh_config, devices=None):
    program = TrainProgram(GLM, optimizer, mesh_config, num_steps=1, global_batch_size=8,
                           devices=devices)
    state = program.init_state(seed=0)
    state, metrics = program.train_step(state, batch)
    return float(metrics["loss"]), jax.device_get(state["params"])

  want_loss, want = one_step(MeshConfig(data=1), devices=jax.devices()[:1])
  got_loss, got = one_step(MeshConfig(data=2, context=4))
  assert got_loss == pytest.approx(want_loss, rel=1e-6)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_context_not_dividing_the_length_is_one_line():
  mesh = make_mesh(MeshConfig(data=2, context=4))
  batch = {k: v[:, :28] for k, v in packed_glm_batch().items()}  # 28 is not a multiple of 2 x 4
  params = init_params(GLM, jax.random.key(0))
  with activation_sharding(mesh, DEFAULT_RULES), pytest.raises(ValueError) as err:
    jax.jit(lambda p, b: forward(p, b, GLM)).lower(params, batch)
  message = str(err.value)
  assert message.startswith("MeshConfig.context=4: the sequence length 28") and "\n" not in message


def test_mixture_of_experts_with_overflowing_experts_equals_one_device():
  """Expert capacity is handed out in token order: with experts that overflow (capacity factor
  0.5 drops tokens), context = 2 / 4 must drop the same tokens as one device, not those of the
  zig-zag order the layers see."""
  config = dataclasses.replace(GLM, num_experts=4, experts_top_k=2, expert_capacity_factor=0.5)
  batch = packed_glm_batch()
  params = init_params(config, jax.random.key(7))
  want_logits, want_grads = logits_and_grads(config, params, batch)
  valid = batch["segment_ids"] != 0
  for context in (2, 4):
    mesh = make_mesh(MeshConfig(data=8 // context, context=context))
    got_logits, got_grads = logits_and_grads(config, params, batch, mesh)
    np.testing.assert_allclose(got_logits[valid], want_logits[valid], rtol=1e-5, atol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                                 jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_remat_layer_scan_keeps_no_per_block_ring_state():
  """Issue #16: the gradient of the model (layers scanned, full remat) on a context mesh holds no
  stack of the ring's per-(ring step, key tile) block stats. The old ring's skip branch (a block
  of zeros, a function of the masks only) was hoisted out of the layer scan by JAX's partial
  evaluation and every block's (o, m, l) kept, stacked: [c, tiles, b, L / c, kv, g, d] float32
  a device, so per-device memory did not fall with the context size (on TPU, 64 GiB at 128K)."""
  context, length = 4, 256
  config = dataclasses.replace(GLM, max_length=length, remat_policy="nothing_saveable")
  params = init_params(config, jax.random.key(0))
  batch = packed_glm_batch()
  batch = {k: np.tile(v, (1, length // LENGTH)) for k, v in batch.items()}

  def objective(params):
    return jnp.sum(forward(params, batch, config) ** 2)

  mesh = make_mesh(MeshConfig(data=1, context=context), devices=jax.devices()[:context])
  with activation_sharding(mesh, DEFAULT_RULES):
    hlo = jax.jit(jax.grad(objective)).lower(params).compile().as_text()
  local_q5 = (2, length // context, config.num_kv_heads, config.num_heads // config.num_kv_heads,
              config.head_dim)
  q5 = ",".join(map(str, local_q5))
  stacked = re.findall(rf"f32\[(?:\d+,)+{q5}\]", hlo)  # one or more leading (step, tile) dims
  assert not stacked, f"ring block stats stacked over steps / key tiles: {sorted(set(stacked))}"
  assert re.search(rf"f32\[{q5}\]", hlo)  # the check reads the right shapes: the running o
