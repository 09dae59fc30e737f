#!/usr/bin/env python3
"""Compile time of a train-step-shaped function (forward + grad) against depth.

    python benchmarks/compile_scaling.py [--layers 2 8 32] [--reps 3] [--unrolled-up-to 8]

The model runs its layers with `lax.scan` (+ `jax.checkpoint`), so the
compiled program holds one layer body whatever the depth: compiling 32
layers should cost about what 2 layers cost. For contrast, `--unrolled-up-to`
also compiles the same layers as a Python loop (one copy of the layer per
layer in the program), the layout scan avoids.

Measured: wall time of `jax.jit(value_and_grad(loss)).lower(...).compile()`
on fresh functions (no persistent compilation cache); best of --reps (on a
shared machine contention only ever adds time), median alongside.
Prints a table and a `RESULT_JSON:` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from glmjax.model import init_params, presets  # noqa: E402
from glmjax.model import transformer  # noqa: E402
from glmjax.trainer.loss import token_loss_sums  # noqa: E402

BATCH, LENGTH = 4, 128


def small_config(num_layers: int):
  return dataclasses.replace(presets.get("llama-small"), num_layers=num_layers, vocab_size=4096, d_model=256,
                             num_heads=4, num_kv_heads=2, head_dim=64, ffn_dim=704, max_length=LENGTH)


def scanned_loss(params, batch, config):
  logits = transformer.forward(params, batch, config)
  sums = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
  return sums["nll_sum"] / sums["weight_sum"]


def unrolled_loss(params, batch, config):
  """The same model with a Python loop over layers (what the scan replaces)."""
  batch = transformer.default_fields(batch)
  ctx = transformer.position_context(batch, config)
  x = transformer.embed(params, batch, config)
  block = transformer.remat(lambda layer, h: transformer.block(layer, h, ctx, config)[0], config)
  for i in range(config.num_layers):
    x = block(jax.tree.map(lambda p, i=i: p[i], params["layers"]), x)
  logits = transformer.logits_from_hidden(params, x, config)
  sums = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
  return sums["nll_sum"] / sums["weight_sum"]


def compile_seconds(loss_fn, config) -> float:
  params = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
  spec = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
  batch = {"tokens": spec, "targets": spec, "loss_mask": jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.float32)}
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, config)))
  t0 = time.perf_counter()
  fn.lower(params, batch).compile()
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--unrolled-up-to", type=int, default=32,
                      help="also compile the unrolled layout for depths up to this (0: skip)")
  args = parser.parse_args()
  load_start = os.getloadavg()
  compile_seconds(scanned_loss, small_config(1))  # warm up tracing / backend initialisation
  rows = []
  for layers in args.layers:
    config = small_config(layers)
    scanned = [compile_seconds(scanned_loss, config) for _ in range(args.reps)]
    unrolled = []
    if layers <= args.unrolled_up_to:
      unrolled = [compile_seconds(unrolled_loss, config) for _ in range(max(1, args.reps - 1))]
    rows.append({"layers": layers, "scanned_s": min(scanned), "scanned_median_s": statistics.median(scanned),
                 "scanned_all_s": scanned, "unrolled_s": min(unrolled) if unrolled else None,
                 "unrolled_all_s": unrolled})
    print(f"layers {layers:3d}: scan {scanned}" + (f", unrolled {unrolled}" if unrolled else ""), flush=True)
  base = rows[0]["scanned_s"]
  print(f"\n| layers | scan + remat compile, best (median) s | vs {rows[0]['layers']} layers "
        "| unrolled compile, best s | unrolled vs scan |")
  print("|---|---|---|---|---|")
  for r in rows:
    unrolled = f"{r['unrolled_s']:.2f} | {r['unrolled_s'] / r['scanned_s']:.1f}x" if r["unrolled_s"] else "not run | -"
    print(f"| {r['layers']} | {r['scanned_s']:.2f} ({r['scanned_median_s']:.2f}) | {r['scanned_s'] / base:.2f}x "
          f"| {unrolled} |")
  print(f"load average {load_start} -> {os.getloadavg()}")
  print("RESULT_JSON: " + json.dumps({"rows": rows, "batch": BATCH, "length": LENGTH, "jax": jax.__version__,
                                      "loadavg_start": load_start, "loadavg_end": os.getloadavg()}))


if __name__ == "__main__":
  main()
