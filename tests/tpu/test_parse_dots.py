"""glmjax.aot.parse_dots: every dot of a compiled module, with its shapes and how often it runs
(benchmarks/train_throughput.py's matmul_step peer replays them)."""

import jax
import jax.numpy as jnp

from glmjax import aot


def _compiled_hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def test_scanned_dots_count_once_per_trip_and_batched_dims_are_kept():
  T, K, N, trips = 64, 32, 48, 5
  w = jnp.ones((K, K), jnp.float32)
  x = jnp.ones((T, K), jnp.float32)
  q = jnp.ones((2, 3, 16, 8), jnp.float32)
  k = jnp.ones((2, 3, 24, 8), jnp.float32)
  head = jnp.ones((K, N), jnp.float32)

  def fn(x, w, q, k, head):
    def body(carry, _):
      return jnp.tanh(carry @ w), None
    h, _ = jax.lax.scan(body, x, None, length=trips)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    return (h @ head).sum() + scores.sum()

  dots = aot.parse_dots(_compiled_hlo(fn, x, w, q, k, head))
  by_shapes = {(d["lhs"], d["rhs"]): d for d in dots}
  scanned = by_shapes[((T, K), (K, K))]
  assert scanned["count"] == trips
  assert scanned["flops"] == 2.0 * T * K * K * trips
  assert (scanned["lhs_contracting"], scanned["rhs_contracting"]) == ((1,), (0,))
  assert by_shapes[((T, K), (K, N))]["count"] == 1
  batched = by_shapes[((2, 3, 16, 8), (2, 3, 24, 8))]
  assert batched["out"] == (2, 3, 16, 24) and batched["lhs_batch"] == (0, 1)
  assert batched["flops"] == 2.0 * 2 * 3 * 16 * 24 * 8
  assert sum(d["flops"] for d in dots) == 2.0 * (T * K * K * trips + T * K * N + 2 * 3 * 16 * 24 * 8)


def test_backward_weight_gradient_dot_contracts_the_token_axis():
  T, K, N = 64, 32, 48
  x, w = jnp.ones((T, K), jnp.float32), jnp.ones((K, N), jnp.float32)
  dots = aot.parse_dots(_compiled_hlo(jax.grad(lambda w, x: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1)), w, x))
  signatures = {(d["out"], d["lhs_contracting"], d["rhs_contracting"]) for d in dots}
  # forward x w, dx = dy w^T, dW = x^T dy: three dots of 2 T K N FLOPs each
  assert len(dots) == 3 and all(d["flops"] == 2.0 * T * K * N and d["count"] == 1 for d in dots)
  assert {s[0] for s in signatures} == {(T, N), (T, K), (K, N)}
