"""Vocabulary-heavy heads: the chunked cross-entropy (ModelConfig.loss_impl = 'chunked') equals the
dense formula (sums, gradients, accuracy) and holds fewer temporaries; the named remat policies
equal full remat and offload where asked."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import config_gin
from glmjax.cli import train as train_cli
from glmjax.model import ModelConfig, init_params, transformer
from glmjax.sharding import MeshConfig
from glmjax.trainer import OptimizerConfig, StepConfig, TrainProgram
from glmjax.trainer import loss as loss_lib
from glmjax.trainer.step import float_grad, gradients, loss_and_sums
from tests.train.helpers import random_batches, tiny_model

BATCH, LENGTH = 4, 16
Z_LOSS = 1e-3


def as_jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("overrides", [
    dict(),  # untied lm_head
    dict(tie_embeddings=True),
    dict(lm_head_bias=True, norm="layernorm"),
], ids=["untied", "tied", "bias"])
@pytest.mark.parametrize("chunk", [5, 16, 64])  # 5 does not divide 16; 64 > the length
def test_chunked_sums_and_gradients_equal_dense(overrides, chunk):
  dense = tiny_model(**overrides)
  chunked = dataclasses.replace(dense, loss_impl="chunked", loss_chunk_size=chunk)
  params = init_params(dense, jax.random.PRNGKey(1))
  batch = as_jnp(random_batches(1, BATCH, LENGTH, seed=3)[0])
  assert float(jnp.min(batch["loss_mask"])) == 0.0  # some positions are masked out
  total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

  def run(config):
    fn = jax.jit(float_grad(functools.partial(loss_and_sums, model_config=config, total_weight=total,
                                              z_loss=Z_LOSS, aux_scale=1.0)))
    return jax.device_get(fn(params, batch))

  (want_grads, want), (got_grads, got) = run(dense), run(chunked)
  for key in ("nll_sum", "z_sum", "correct_sum", "weight_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
  assert got["correct_sum"] == want["correct_sum"]  # accuracy: counts, exact
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_chunked_gradient_wrt_hidden_and_head_equals_dense():
  """The loss function itself on random hidden states (ties included: zero rows give equal logits)."""
  config = tiny_model(vocab_size=96)
  params = init_params(config, jax.random.PRNGKey(0))
  head_params = transformer.head_params(params, config)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(3, 13, config.d_model)), jnp.float32).at[:, 4].set(0.0)
  targets = jnp.asarray(rng.integers(0, 96, (3, 13)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 13)) < 0.7, jnp.float32)
  head = lambda hp, x: transformer.head_logits(hp, x, config)  # noqa: E731

  def objective(sums_fn):
    def f(hp, x):
      s = sums_fn(hp, x)
      return s["nll_sum"] + 0.1 * s["z_sum"], s
    return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))

  dense = objective(lambda hp, x: loss_lib.token_loss_sums(head(hp, x), targets, mask))
  chunked = objective(lambda hp, x: loss_lib.chunked_token_loss_sums(head, hp, x, targets, mask, 4))
  (want_hp, want_h), want = jax.device_get(dense(head_params, h))
  (got_hp, got_h), got = jax.device_get(chunked(head_params, h))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_hp["lm_head"]["kernel"], want_hp["lm_head"]["kernel"],
                             rtol=1e-5, atol=1e-7)


def test_chunked_train_step_equals_dense_on_a_mesh_and_through_the_pipeline():
  optimizer = OptimizerConfig(learning_rate=3e-3, schedule="constant")
  batches = random_batches(2, 8, LENGTH, seed=7)

  def run(config, mesh, microbatches):
    prog = TrainProgram(config, optimizer, mesh, num_steps=2, global_batch_size=8,
                        step_config=StepConfig(microbatches=microbatches, z_loss=Z_LOSS))
    state, out = prog.init_state(0), []
    for b in batches:
      state, m = prog.train_step(state, b)
      out.append(jax.device_get(m))
    return out

  for mesh, microbatches in ((MeshConfig(data=2, fsdp=2, tensor=2), 1),
                             (MeshConfig(data=2, fsdp=2, tensor=1, stage=2), 2)):
    dense = tiny_model()
    want = run(dense, mesh, microbatches)
    got = run(dataclasses.replace(dense, loss_impl="chunked", loss_chunk_size=6), mesh, microbatches)
    for g, w in zip(got, want):
      for key in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm", "loss_tokens"):
        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"{mesh} {key}")


def test_chunked_step_holds_fewer_temporaries_for_a_vocabulary_heavy_model():
  """Compiled memory of the gradient step (XLA CPU's memory_analysis): with [B, L, V] = 4 x 256 x
  8192 float32 logits (32 MiB, and their gradient) against a 32-wide model, the chunked loss's
  temporaries must be below the dense one's."""
  dense = tiny_model(vocab_size=8192, max_length=256)
  batch = as_jnp(random_batches(1, 4, 256, seed=1, vocab=8192)[0])
  params = jax.eval_shape(functools.partial(init_params, dense), jax.random.PRNGKey(0))

  def temporaries(config):
    fn = jax.jit(lambda p, b: gradients(p, b, config, StepConfig(z_loss=Z_LOSS)))
    return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  dense_bytes = temporaries(dense)
  chunked_bytes = temporaries(dataclasses.replace(dense, loss_impl="chunked", loss_chunk_size=32))
  logits_bytes = 4 * 256 * 8192 * 4
  assert dense_bytes > logits_bytes
  assert chunked_bytes < dense_bytes


def test_eval_sums_use_the_chunked_loss_too():
  dense = tiny_model()
  chunked = dataclasses.replace(dense, loss_impl="chunked", loss_chunk_size=7)
  mesh = MeshConfig(data=2, fsdp=2, tensor=2)
  batch = random_batches(1, 8, LENGTH, seed=9)[0]
  sums = []
  for config in (dense, chunked):
    prog = TrainProgram(config, OptimizerConfig(), mesh, num_steps=1, global_batch_size=8)
    sums.append(jax.device_get(prog.eval_sums(prog.init_state(0)["params"], batch)))
  for key in sums[0]:
    np.testing.assert_allclose(sums[1][key], sums[0][key], rtol=1e-6, err_msg=key)


# --- gin ----------------------------------------------------------------------------------------


def test_gin_selects_the_chunked_loss():
  config_gin.clear()
  try:
    config_gin.parse(["experiments/demo.gin"], ["ModelConfig.loss_impl = 'chunked'",
                                                "ModelConfig.loss_chunk_size = 512"])
    model = config_gin.build_experiment().model
  finally:
    config_gin.clear()
  assert (model.loss_impl, model.loss_chunk_size) == ("chunked", 512)


@pytest.mark.parametrize("binding, field", [
    ("ModelConfig.loss_impl = 'chunkd'", "loss_impl"),
    ("ModelConfig.loss_chunk_size = 0", "loss_chunk_size"),
    ("ModelConfig.remat_policy = 'offload_layer_inptu'", "remat_policy"),
    ("ModelConfig.remat_policy = 'save=query_proj,kv_proj'", "remat_policy"),
])
def test_a_bad_loss_or_remat_name_is_exit_2_with_one_line(binding, field, capsys):
  config_gin.clear()
  try:
    code = train_cli.main(["--gin_file", "experiments/demo.gin", "--gin", binding, "--workdir", "unused"])
  finally:
    config_gin.clear()
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1 and field in err, err


def test_loss_fields_are_not_the_models_identity():
  from glmjax.model.config import architecture_fields  # pylint: disable=import-outside-toplevel
  fields = architecture_fields(ModelConfig(loss_impl="chunked"))
  assert "loss_impl" not in fields and "loss_chunk_size" not in fields


# --- remat policies -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["save_qkv_proj", "save_out_proj", "offload_layer_input",
                                    "offload_layer_input_save_qkv", "save=attention_out;offload=mlp_out"])
def test_named_remat_policies_equal_full_remat(policy):
  base = tiny_model(num_layers=3)
  params = init_params(base, jax.random.PRNGKey(2))
  batch = as_jnp(random_batches(1, BATCH, LENGTH, seed=4)[0])
  total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

  def run(config):
    fn = jax.jit(float_grad(functools.partial(loss_and_sums, model_config=config, total_weight=total,
                                              z_loss=0.0, aux_scale=1.0)))
    return jax.device_get(fn(params, batch))

  want_grads, want = run(base)
  got_grads, got = run(dataclasses.replace(base, remat_policy=policy))
  np.testing.assert_allclose(got["nll_sum"], want["nll_sum"], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_offload_policy_keeps_the_named_activations_in_host_memory():
  """The residuals the backward keeps: with 'offload_layer_input' the per-layer block inputs are
  <host> buffers (pinned_host), none of them is left on device."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  config = tiny_model(num_layers=3, remat_policy="offload_layer_input")
  params = init_params(config, jax.random.PRNGKey(2))
  batch = as_jnp(random_batches(1, BATCH, LENGTH, seed=4)[0])

  def f(p):
    return loss_and_sums(p, batch, config, 1.0, 0.0, 1.0)[0]

  layer_inputs = [str(aval) for aval, _ in saved_residuals(f, params)
                  if tuple(aval.shape) == (3, BATCH, LENGTH, config.d_model)]
  assert layer_inputs and all("<host>" in a for a in layer_inputs), layer_inputs
