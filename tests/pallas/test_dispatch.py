"""impl dispatch of glmjax.pallas.attention and the errors bad input gets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.pallas import attention, attention_reference, resolve_impl

SPEC = jax.ShapeDtypeStruct


def _auto(q, k, v, segment_ids, bidirectional):
  return attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional, impl="auto")


def test_auto_is_dense_on_cpu_and_the_kernel_when_exported_for_tpu():
  assert resolve_impl("auto", "cpu") == "dense"
  assert resolve_impl("auto", "tpu") == resolve_impl("auto", "gpu") == "pallas"
  args = (SPEC((1, 256, 4, 64), jnp.float32), SPEC((1, 256, 2, 64), jnp.float32),
          SPEC((1, 256, 2, 64), jnp.float32), SPEC((1, 256), jnp.int32), SPEC((1, 256), jnp.int32))
  for platform, kernels in (("cpu", 0), ("tpu", 1)):
    text = jax.export.export(jax.jit(_auto), platforms=[platform])(*args).mlir_module()
    assert text.count("@tpu_custom_call") == kernels, platform


def test_auto_on_cpu_equals_the_reference():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 24, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 24, 2, 8)), jnp.float32)
  segment_ids = np.repeat([[1, 2, 0]], 8, axis=1).repeat(2, axis=0)
  bidirectional = np.zeros_like(segment_ids)
  np.testing.assert_allclose(
      jax.jit(_auto)(q, k, k, segment_ids, bidirectional),
      attention_reference(q, k, k, segment_ids=segment_ids, bidirectional=bidirectional), atol=1e-6)


def _call(q_shape=(1, 32, 4, 16), kv_shape=(1, 32, 2, 16), seg_shape=(1, 32), slopes=None,
          **options):
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  seg = jnp.ones(seg_shape, jnp.int32)
  return attention(q, k, k, segment_ids=seg, bidirectional=seg, alibi_slopes=slopes, impl="pallas",
                   interpret=True, **options)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_shape=(1, 32, 3, 16)), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(seg_shape=(1, 31)), "segment_ids must be"),
    (dict(kv_shape=(1, 40, 2, 16)), "decode_attention"),
    (dict(slopes=jnp.zeros(3)), "alibi_slopes must be"),
    (dict(block_q=48), "block_q=48 must be a power of two"),
    (dict(backend="cuda"), "backend='cuda' is not one of"),
])
def test_bad_input_names_the_argument(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _call(**kwargs)


def test_unknown_impl():
  with pytest.raises(ValueError, match="impl='flash' is not one of"):
    attention(jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 8, 1, 8)),
              segment_ids=jnp.ones((1, 8)), bidirectional=jnp.ones((1, 8)), impl="flash")
