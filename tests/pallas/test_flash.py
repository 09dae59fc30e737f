"""Flash kernels (interpret mode) against the XLA reference: outputs and dq, dk, dv, dslopes."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import jax.numpy as jnp
import pytest

import glmjax.pallas
from glmjax.pallas import flash
from tests.pallas import cases


@dataclasses.dataclass(frozen=True)
class Case:
  backend: str
  layout: str
  batch: int
  length: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  alibi: bool
  dtype: str
  block_q: int
  block_k: int


# Lengths are never a multiple of the blocks; groups 1, 2, 4 and 8; head_dim 48
# and 96 take the padding path.
CASES = [
    Case("mosaic_tpu", "glm", 2, 70, 4, 2, 32, True, "float32", 16, 32),
    Case("triton", "glm", 2, 70, 4, 2, 32, True, "float32", 16, 32),
    Case("mosaic_tpu", "causal", 1, 100, 8, 1, 16, False, "float32", 32, 16),
    Case("triton", "causal", 1, 100, 8, 1, 16, False, "float32", 32, 16),
    Case("mosaic_tpu", "bidirectional", 2, 45, 2, 2, 64, False, "float32", 16, 16),
    Case("triton", "bidirectional", 2, 45, 2, 2, 64, False, "float32", 16, 16),
    Case("mosaic_tpu", "scattered", 1, 90, 4, 1, 48, True, "float32", 16, 32),
    Case("triton", "scattered", 1, 90, 4, 1, 48, True, "float32", 32, 16),
    Case("mosaic_tpu", "glm", 1, 40, 2, 1, 96, False, "float32", 16, 16),
    Case("mosaic_tpu", "glm", 2, 60, 4, 2, 64, True, "bfloat16", 16, 32),
    Case("triton", "glm", 2, 60, 4, 2, 64, True, "bfloat16", 32, 16),
]


def _tolerances(dtype):
  return (2e-5, 5e-5) if dtype == "float32" else (2e-2, 4e-2)


def _case_id(c: Case) -> str:
  alibi = "alibi-" if c.alibi else ""
  return f"{c.backend}-{c.layout}-g{c.num_heads // c.num_kv_heads}-d{c.head_dim}-{alibi}{c.dtype}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case: Case):
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  dtype = jnp.dtype(case.dtype)
  segment_ids, bidirectional = cases.packed_batch(rng, case.batch, case.length, case.layout)
  q, k, v = cases.qkv(rng, case.batch, case.length, case.num_heads, case.num_kv_heads,
                      case.head_dim, dtype)
  slopes = cases.alibi_slopes(case.num_heads)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32).astype(dtype)

  def kernel(q, k, v, slopes):
    return flash.flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                 alibi_slopes=slopes if case.alibi else None, block_q=case.block_q,
                                 block_k=case.block_k, backend=case.backend, interpret=True)

  # The reference runs in float32 on the same (possibly bf16-rounded) inputs.
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  expected, expected_grads = cases.value_and_grads(
      cases.reference_fn(segment_ids, bidirectional, case.alibi), *upcast, slopes,
      d_out.astype(jnp.float32))
  actual, actual_grads = cases.value_and_grads(kernel, q, k, v, slopes, d_out)
  assert actual.dtype == dtype and actual_grads[0].dtype == dtype
  out_tol, grad_tol = _tolerances(case.dtype)
  cases.assert_close(actual, expected, tolerance=out_tol, name="out")
  names = ("dq", "dk", "dv", "dslopes") if case.alibi else ("dq", "dk", "dv")
  for name, got, want in zip(names, actual_grads, expected_grads):
    cases.assert_close(got, want, tolerance=grad_tol, name=name)


@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_padding_rows_give_zeros_not_nan(backend):
  """Padding queries see no key: zero output and zero gradients, everything finite."""
  rng = np.random.default_rng(7)
  length = 50
  segment_ids = np.zeros((2, length), np.int32)
  segment_ids[0, :20] = 1
  segment_ids[0, 20:33] = 2  # row 1 is all padding
  bidirectional = np.zeros_like(segment_ids)
  bidirectional[0, :5] = 1
  q, k, v = cases.qkv(rng, 2, length, 4, 2, 32, jnp.float32)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def kernel(q, k, v, slopes):
    return flash.flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                 alibi_slopes=slopes, block_q=16, block_k=16, backend=backend,
                                 interpret=True)

  out, (dq, dk, dv, dslopes) = cases.value_and_grads(kernel, q, k, v, cases.alibi_slopes(4), d_out)
  padding = segment_ids == 0
  for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dslopes", dslopes)):
    assert np.all(np.isfinite(np.asarray(x))), name
  for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.all(np.asarray(x)[padding] == 0.0), name
  assert np.any(np.asarray(out)[~padding] != 0.0)


@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_skipped_key_blocks_are_never_read(backend):
  """Key blocks that only hold padding are skipped: NaN planted there cannot leak."""
  rng = np.random.default_rng(11)
  length, block = 96, 16
  segment_ids = np.zeros((1, length), np.int32)
  segment_ids[0, :30], segment_ids[0, 30:58] = 1, 2  # blocks 4 and 5 are pure padding
  bidirectional = (np.arange(length) % 7 == 0).astype(np.int32)[None]
  q, k, v = cases.qkv(rng, 1, length, 2, 1, 32, jnp.float32)
  poisoned = np.zeros((1, length, 1, 1), bool)
  poisoned[0, 64:] = True
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  slopes = cases.alibi_slopes(2)

  def kernel(q, k, v, slopes):
    return flash.flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                 alibi_slopes=slopes, block_q=block, block_k=block,
                                 backend=backend, interpret=True)

  out, grads = cases.value_and_grads(kernel, q, jnp.where(poisoned, jnp.nan, k),
                                     jnp.where(poisoned, jnp.nan, v), slopes, d_out)
  expected, expected_grads = cases.value_and_grads(
      cases.reference_fn(segment_ids, bidirectional, True), q, jnp.where(poisoned, 0.0, k),
      jnp.where(poisoned, 0.0, v), slopes, d_out)
  cases.assert_close(out, expected, tolerance=2e-5, name="out")
  for name, got, want in zip(("dq", "dk", "dv", "dslopes"), grads, expected_grads):
    cases.assert_close(got, want, tolerance=5e-5, name=name)


def test_attention_entry_point_pallas_auto_backend():
  """impl="pallas" with default options: on CPU the Triton kernels run in interpret mode."""
  rng = np.random.default_rng(3)
  segment_ids, bidirectional = cases.packed_batch(rng, 1, 200, "glm")
  q, k, v = cases.qkv(rng, 1, 200, 4, 2, 32, jnp.float32)
  expected = glmjax.pallas.attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                     impl="xla")
  actual = glmjax.pallas.attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                   impl="pallas", block_q=64, block_k=64)
  cases.assert_close(actual, expected, tolerance=2e-5, name="out")
