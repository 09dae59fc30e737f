"""Peak per-device memory of one training step vs sequence length: context = 1 vs 8.

    python benchmarks/long_context.py [--lengths 8192 16384 32768 65536] [--impl dense]

On 8 emulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here), the
train step of a small GLM-style model (rope_2d, GQA, packed batch of one row) is compiled
ahead of time for a one-device mesh (context=1: the whole sequence on one device) and for
MeshConfig(data=1, context=8) (ring attention, glmjax.pallas.ring), and the per-device peak
of `compiled.memory_analysis()` is reported (arguments + outputs + temporaries - aliased +
code, glmjax.aot.per_device_bytes). Nothing is run: the figures are what XLA's buffer
assignment allocates for the program, not measured resident memory.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

from glmjax import aot  # noqa: E402
from glmjax.model import ModelConfig  # noqa: E402
from glmjax.sharding import MeshConfig  # noqa: E402
from glmjax.trainer import OptimizerConfig, TrainProgram  # noqa: E402


def model(length: int, impl: str) -> ModelConfig:
  return ModelConfig(vocab_size=1024, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=64, ffn_dim=1024, max_length=length, position="rope_2d",
                     attention_impl=impl)


def peak_bytes(length: int, context: int, impl: str) -> tuple[dict, float]:
  devices = jax.devices()[:context]
  program = TrainProgram(model(length, impl), OptimizerConfig(learning_rate=1e-3), MeshConfig(data=1, context=context),
                         num_steps=10, global_batch_size=1, devices=devices)
  start = time.perf_counter()
  compiled = program.lower("train", length).compile()
  return aot.per_device_bytes(compiled.memory_analysis()), time.perf_counter() - start


def attention_temp_bytes(length: int, context: int) -> int:
  """Temporaries of grad(sum(attention)) alone (q [1, L, 4, 64], k = v [1, L, 2, 64], float32,
  one bidirectional segment), impl="dense"; ring attention when context > 1."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from glmjax import pallas  # pylint: disable=import-outside-toplevel
  from glmjax.sharding import DEFAULT_RULES, activation_sharding, make_mesh  # pylint: disable=import-outside-toplevel
  spec = jax.ShapeDtypeStruct
  args = (spec((1, length, 4, 64), jnp.float32), spec((1, length, 2, 64), jnp.float32),
          spec((1, length), jnp.int32))

  def loss(q, k, seg):
    return jnp.sum(pallas.attention(q, k, k, segment_ids=seg, bidirectional=seg, impl="dense"))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  if context == 1:
    return int(step.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  with activation_sharding(make_mesh(MeshConfig(data=1, context=context)), DEFAULT_RULES):
    return int(step.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
  parser.add_argument("--impl", default="dense", help="attention_impl (xla / dense / pallas)")
  args = parser.parse_args()
  mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
  print("| L | context=1 peak MiB | context=8 peak MiB per device | ratio | context=8 temporaries MiB |")
  print("|---|---|---|---|---|")
  for length in args.lengths:
    one, _ = peak_bytes(length, 1, args.impl)
    eight, _ = peak_bytes(length, 8, args.impl)
    print(f"| {length} | {mib(one['peak'])} | {mib(eight['peak'])} | {one['peak'] / eight['peak']:.1f}x "
          f"| {mib(eight['temporaries'])} |", flush=True)
  print()
  print("| L | attention op alone, context=1 temp MiB | context=8 (ring) temp MiB per device | ratio |")
  print("|---|---|---|---|")
  for length in args.lengths:
    one, eight = attention_temp_bytes(length, 1), attention_temp_bytes(length, 8)
    print(f"| {length} | {mib(one)} | {mib(eight)} | {one / eight:.0f}x |", flush=True)


if __name__ == "__main__":
  main()
