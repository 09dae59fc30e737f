"""The kernels lower for TPU (Mosaic) and CUDA (Triton) from this CPU machine, forward and backward.

jax.export runs the full Pallas lowering for the named platform; the kernels
then appear as custom calls. Triton custom calls carry no serialization
compatibility guarantee, so that one safety check is disabled for "cuda".
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from glmjax.pallas import attention

KERNEL_CALL = {"tpu": "@tpu_custom_call", "cuda": "@__gpu$xla.gpu.triton"}
NO_TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

# (batch, length, heads, kv_heads, head_dim, dtype, alibi)
SHAPES = [
    (2, 1024, 8, 2, 128, jnp.bfloat16, True),
    (1, 2048, 4, 4, 64, jnp.bfloat16, False),
    (1, 1000, 4, 1, 96, jnp.float32, True),
]


def _arguments(batch, length, heads, kv_heads, head_dim, dtype, alibi):
  spec = jax.ShapeDtypeStruct
  return (spec((batch, length, heads, head_dim), dtype),
          spec((batch, length, kv_heads, head_dim), dtype),
          spec((batch, length, kv_heads, head_dim), dtype),
          spec((batch, length), jnp.int32), spec((batch, length), jnp.int32),
          spec((heads,), jnp.float32) if alibi else None)


def _forward(q, k, v, segment_ids, bidirectional, slopes):
  return attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                   alibi_slopes=slopes, impl="pallas")


def _backward(q, k, v, segment_ids, bidirectional, slopes):
  def loss(q, k, v, slopes):
    return jnp.sum(_forward(q, k, v, segment_ids, bidirectional, slopes).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2, 3) if slopes is not None else (0, 1, 2))(q, k, v, slopes)


def _tensor_shapes(module_text):
  for match in re.finditer(r"tensor<([0-9x]+)x[a-z]", module_text):
    yield tuple(int(d) for d in match.group(1).split("x"))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[1]}-h{s[2]}-kv{s[3]}-d{s[4]}")
def test_forward_and_backward_lower(platform, shape):
  length = shape[1]
  args = _arguments(*shape)
  for fn, kernels in ((_forward, 1), (_backward, 3)):
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=NO_TRITON_CHECK)(*args)
    text = exported.mlir_module()
    assert text.count(KERNEL_CALL[platform]) == kernels, f"{fn.__name__}: kernels not lowered"
    quadratic = [s for s in _tensor_shapes(text) if sum(d >= length for d in s) >= 2]
    assert not quadratic, f"{fn.__name__} materialises an [L, L] tensor: {quadratic[:3]}"


def test_the_reference_does_materialise_scores():
  """Guards the [L, L] detector above: the XLA reference must trip it."""
  args = _arguments(*SHAPES[0])

  def reference(q, k, v, segment_ids, bidirectional, slopes):
    return attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                     alibi_slopes=slopes, impl="xla")

  text = jax.export.export(jax.jit(reference), platforms=["tpu"])(*args).mlir_module()
  assert any(sum(d >= SHAPES[0][1] for d in s) >= 2 for s in _tensor_shapes(text))
