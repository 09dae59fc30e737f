#!/usr/bin/env python3
"""Pipeline bubble on 8 emulated CPU devices: GPipe vs (S - 1) / (M + S - 1), circular vs
(S - 1) / (R M + S - 1).

    python benchmarks/pipeline.py                 # S in {2, 4}, M in {S, 2S, 4S}, GPipe and R = 2
    python benchmarks/pipeline.py --schedules circular --circular-repeats 2 4

glmjax.trainer.pipeline runs R M + S - 1 clock ticks (GPipe: R = 1); at each tick every stage
runs one chunk of N / (S R) layers (on a real pod a stage with no microbatch idles; here, in
a bubble tick, it computes on data that is then discarded), so the work of the whole
pipelined step is (R M + S - 1) / (R M) times the work of the same step without stages. On
emulated devices, which share the host's cores, the wall time measures total work, so

    measured bubble = 1 - t(unpipelined) / t(pipelined)

compares with GPipe's bubble fraction (S - 1) / (M + S - 1) (Huang et al. 2019, sec. 2.2) and
the circular schedule's (S - 1) / (R M + S - 1) (Narayanan et al. 2021, sec. 2.2);
the excess is the pipeline's own overhead (ppermute copies, the per-tick context slices,
the outputs' psum). The unpipelined step is the same loss and gradient on a data-only mesh
(data = 8): the same rows per device, the same math. Both are compiled in one process and
timed alternately (A B A B ...) so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from glmjax.model import forward, init_params, presets  # noqa: E402
from glmjax.sharding import DEFAULT_RULES, MeshConfig, activation_sharding, make_mesh, param_shardings  # noqa: E402
from glmjax.trainer import pipeline  # noqa: E402

CONFIG = dataclasses.replace(presets.get("tiny-llama"), vocab_size=512, d_model=256, num_layers=8, num_heads=4,
                             num_kv_heads=4, head_dim=64, ffn_dim=768, max_length=128, attention_impl="dense",
                             remat_policy="none")
BATCH, LENGTH = 128, 64


def nll(logits, batch):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1))


def make_step(mesh, microbatches, repeats=1):
  def loss(p, b):
    if microbatches:
      logits = pipeline.forward_with_aux(p, b, CONFIG, microbatches=microbatches, repeats=repeats)[0]
    else:
      logits = forward(p, b, CONFIG)
    return nll(logits, b)

  grad = jax.jit(jax.value_and_grad(loss))

  def run(params, batch):
    with activation_sharding(mesh, DEFAULT_RULES):
      value, grads = grad(params, batch)
    jax.block_until_ready(grads)
    return float(value)
  return run


def placed(mesh, params, batch):
  params = jax.device_put(params, param_shardings(CONFIG, mesh, DEFAULT_RULES))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  return params, jax.device_put(batch, rows)


def timed_pair(step, flat, repeats):
  """Median wall times (t_pipe, t_flat) and the median ratio t_flat / t_pipe, timed A B A B ..."""
  t_pipe, t_flat = [], []
  for _ in range(repeats):
    for fn, times in ((step, t_pipe), (flat, t_flat)):
      t0 = time.perf_counter()
      fn[0](*fn[1:])
      times.append(time.perf_counter() - t0)
  return statistics.median(t_pipe), statistics.median(t_flat), statistics.median(
      [f / p for f, p in zip(t_flat, t_pipe)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per row")
  parser.add_argument("--schedules", nargs="+", default=["gpipe", "circular"], choices=["gpipe", "circular"])
  parser.add_argument("--circular-repeats", type=int, nargs="+", default=[2],
                      help="the circular schedule's layer chunks per stage R (each must divide layers / S)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32),
           "targets": rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)}
  params = init_params(CONFIG, jax.random.key(0))
  flat_mesh = make_mesh(MeshConfig(data=8))
  flat = (make_step(flat_mesh, 0),) + placed(flat_mesh, params, batch)
  want = flat[0](*flat[1:])
  print(f"{jax.device_count()} emulated devices on {os.cpu_count()} cores; jax {jax.__version__}; "
        f"model d={CONFIG.d_model} layers={CONFIG.num_layers}, batch {BATCH} x {LENGTH}")
  rows = [("gpipe", 1)] * ("gpipe" in args.schedules) + [
      ("circular", r) for r in args.circular_repeats if "circular" in args.schedules]
  print("| schedule | stages S | repeats R | microbatches M | bubble (S-1)/(RM+S-1) | measured 1 - t_flat/t_pipe | "
        "t_pipe (s) | t_flat (s) | loss equal |")
  print("|---|---|---|---|---|---|---|---|---|")
  for schedule, repeats in rows:
    for stages in (2, 4):
      if CONFIG.num_layers % (stages * repeats):
        continue
      mesh = make_mesh(MeshConfig(data=8 // stages, stage=stages, pipeline_schedule=schedule,
                                  pipeline_repeats=repeats))
      for microbatches in (stages, 2 * stages, 4 * stages):
        step = (make_step(mesh, microbatches, repeats),) + placed(mesh, params, batch)
        got = step[0](*step[1:])
        t_pipe, t_flat, ratio = timed_pair(step, flat, args.repeats)
        formula = pipeline.bubble_fraction(stages, microbatches, repeats)
        print(f"| {schedule} | {stages} | {repeats} | {microbatches} | {formula:.3f} | {1 - ratio:.3f} | "
              f"{t_pipe:.3f} | {t_flat:.3f} | {abs(got - want) <= 1e-5 * abs(want)} |", flush=True)


if __name__ == "__main__":
  main()
