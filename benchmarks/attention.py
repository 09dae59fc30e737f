"""Attention memory and speed: the XLA reference vs the Pallas flash kernels.

    python benchmarks/attention.py memory [--lengths 1024 2048 ...]
    python benchmarks/attention.py speed  [--lengths 2048 ... 32768]   # needs a GPU

memory: compiles forward+backward (grad of a sum) for each length and reports
`memory_analysis().temp_size_in_bytes` of the compiled program. On a CPU
host the Pallas kernels compile in interpret mode, i.e. the same HLO around
the kernels with each kernel body run as a loop over its tiles; it shows what
the program allocates outside the tiles, not VMEM/SMEM use on an accelerator.
It also exports the program for TPU (Mosaic kernels) and reports the largest
tensor in that module, where the reference's [b, h, L, L] scores appear and
the kernel program's largest tensor is O(L).

speed: on a GPU, forward+backward wall time of the Triton kernels against
jax.nn.dot_product_attention(implementation="cudnn"), causal, same shapes.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import jax
import jax.numpy as jnp

from glmjax.pallas import attention

BATCH, HEADS, KV_HEADS, HEAD_DIM, DTYPE = 1, 8, 2, 128, jnp.bfloat16


def _shapes(length):
  spec = jax.ShapeDtypeStruct
  return (spec((BATCH, length, HEADS, HEAD_DIM), DTYPE),
          spec((BATCH, length, KV_HEADS, HEAD_DIM), DTYPE),
          spec((BATCH, length, KV_HEADS, HEAD_DIM), DTYPE),
          spec((BATCH, length), jnp.int32), spec((BATCH, length), jnp.int32))


def _train_step(impl):
  def loss(q, k, v, segment_ids, bidirectional):
    out = attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional, impl=impl)
    return jnp.sum(out.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def _largest_tensor_bytes(module_text):
  sizes = {"bf16": 2, "f32": 4, "i32": 4, "i1": 1, "f16": 2}
  largest = 0
  for dims, dtype in re.findall(r"tensor<([0-9x]+)x(bf16|f32|i32|i1|f16)>", module_text):
    largest = max(largest, int(np.prod([int(d) for d in dims.split("x")])) * sizes[dtype])
  return largest


def _mib(n):
  return f"{n / 2**20:,.1f}"


def memory(lengths):
  print("| L | xla temp MiB | pallas temp MiB (CPU interpret) | xla largest tensor MiB (TPU export) "
        "| pallas largest tensor MiB (TPU export) |")
  print("|---|---|---|---|---|")
  for length in lengths:
    row = [str(length)]
    for impl in ("xla", "pallas"):
      compiled = jax.jit(_train_step(impl)).lower(*_shapes(length)).compile()
      row.append(_mib(compiled.memory_analysis().temp_size_in_bytes))
    for impl in ("xla", "pallas"):
      exported = jax.export.export(jax.jit(_train_step(impl)), platforms=["tpu"])(*_shapes(length))
      row.append(_mib(_largest_tensor_bytes(exported.mlir_module())))
    print("| " + " | ".join(row) + " |", flush=True)


def _time(fn, args, repeats=10):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def speed(lengths):
  if jax.default_backend() != "gpu":
    raise SystemExit("speed needs a GPU (cuDNN); this host has " + jax.default_backend())

  def cudnn_loss(q, k, v, segment_ids, bidirectional):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))

  pallas_step = jax.jit(_train_step("pallas"))
  cudnn_step = jax.jit(jax.grad(cudnn_loss, argnums=(0, 1, 2)))
  print("| L | pallas fwd+bwd ms | cuDNN fwd+bwd ms | pallas / cuDNN |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(0)
  for length in lengths:
    q, k, v = (jnp.asarray(rng.normal(size=s.shape), DTYPE) for s in _shapes(length)[:3])
    segment_ids = jnp.ones((BATCH, length), jnp.int32)
    causal = jnp.zeros((BATCH, length), jnp.int32)
    args = (q, k, v, segment_ids, causal)
    pallas_s, cudnn_s = _time(pallas_step, args), _time(cudnn_step, args)
    print(f"| {length} | {pallas_s * 1e3:.2f} | {cudnn_s * 1e3:.2f} | {pallas_s / cudnn_s:.2f} |",
          flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=["memory", "speed"])
  parser.add_argument("--lengths", type=int, nargs="+")
  args = parser.parse_args()
  if args.mode == "memory":
    memory(args.lengths or [1024, 2048, 4096, 8192, 16384])
  else:
    speed(args.lengths or [2048, 4096, 8192, 16384, 32768])


if __name__ == "__main__":
  main()
