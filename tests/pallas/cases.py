"""Seeded random attention inputs in the batch layouts the model produces."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from glmjax.pallas import reference

LAYOUTS = ("glm", "causal", "bidirectional", "scattered")


def packed_row(rng, length: int, layout: str):
  """One packed row: (segment_ids, bidirectional), int32 [length], trailing padding.

  glm: each segment is Part A (bidirectional) then Part B (causal);
  causal / bidirectional: every token one way; scattered: random bidirectional
  tokens anywhere (not contiguous, exercises the superset block ranges).
  """
  segment_ids = np.zeros(length, np.int32)
  bidirectional = np.zeros(length, np.int32)
  used = length - int(rng.integers(0, length // 4 + 1))
  position, segment = 0, 1
  while position < used:
    size = min(int(rng.integers(3, max(4, length // 2))), used - position)
    segment_ids[position:position + size] = segment
    if layout == "glm":
      bidirectional[position:position + int(rng.integers(1, size + 1))] = 1
    elif layout == "bidirectional":
      bidirectional[position:position + size] = 1
    elif layout == "scattered":
      bidirectional[position:position + size] = rng.random(size) < 0.3
    position += size
    segment += 1
  return segment_ids, bidirectional


def packed_batch(rng, batch: int, length: int, layout: str):
  rows = [packed_row(rng, length, layout) for _ in range(batch)]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def alibi_slopes(num_heads: int):
  """Geometric slopes 2^(-8 h / H) (Press et al. 2022)."""
  return jnp.asarray([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], jnp.float32)


def qkv(rng, batch, length, num_heads, num_kv_heads, head_dim, dtype):
  def draw(heads):
    return jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32).astype(dtype)
  return draw(num_heads), draw(num_kv_heads), draw(num_kv_heads)


def value_and_grads(attention_fn, q, k, v, slopes, d_out):
  """Output and (dq, dk, dv, dslopes) of <attention_fn(q, k, v, slopes), d_out>, jitted."""
  def run(q, k, v, slopes):
    out, vjp = jax.vjp(attention_fn, q, k, v, slopes)
    return out, vjp(d_out)
  return jax.jit(run)(q, k, v, slopes)


def reference_fn(segment_ids, bidirectional, use_alibi):
  def fn(q, k, v, slopes):
    return reference.attention_reference(q, k, v, segment_ids=segment_ids,
                                         bidirectional=bidirectional,
                                         alibi_slopes=slopes if use_alibi else None)
  return fn


def assert_close(actual, expected, *, tolerance, name):
  """|actual - expected| <= tolerance * max(1, max|expected|), and no NaN."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  scale = max(1.0, float(np.max(np.abs(expected))))
  error = float(np.max(np.abs(actual - expected)))
  assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance:.3g} * {scale:.3g}"
