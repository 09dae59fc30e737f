"""Export / import: time and peak host memory, against transformers' own save / load.

  python benchmarks/export_memory.py [--layers 8 16 32]

A LLaMA (vocab 32000, d_model 1024, 16 heads / 8 kv heads, ffn 2816) with
`--layers` layers is initialised sharded over 8 emulated CPU devices
(fsdp=4 x tensor=2). For each depth: `glmjax.export.to_huggingface` (500MB
shards) and `from_huggingface` throughput, and the peak growth of the process
RSS during export (sampled every 5 ms) next to the growth caused by
`jax.device_get(params)`, the naive gather-then-save route. Peer speed: the
same folder loaded into transformers (`from_pretrained`) and written back with
`save_pretrained` in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import tempfile
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from glmjax.export import from_huggingface, to_huggingface  # noqa: E402
from glmjax.model import count_params, init_params, is_spec, param_specs, presets  # noqa: E402

MESH_AXIS = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


class PeakRss:
  """Peak resident memory above the level at entry, sampled in a thread."""

  def __enter__(self):
    gc.collect()
    time.sleep(0.3)
    self._proc = psutil.Process()
    self.base = self.peak = self._proc.memory_info().rss
    self._stop = False
    self._thread = threading.Thread(target=self._sample)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop:
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(0.005)

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()

  @property
  def growth_mb(self) -> float:
    return (self.peak - self.base) / 1e6


def sharded_params(config, mesh):
  def sharding(spec):
    used, axes = set(), []
    for name in spec.axes:
      axis = MESH_AXIS.get(name)
      axes.append(axis if axis and axis not in used else None)
      used.add(axis)
    return NamedSharding(mesh, PartitionSpec(*axes))
  shardings = jax.tree_util.tree_map(sharding, param_specs(config), is_leaf=is_spec)
  params = jax.jit(lambda key: init_params(config, key), out_shardings=shardings)(jax.random.key(0))
  return jax.block_until_ready(params)


def run(num_layers: int, mesh) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(presets.get("llama-small"), vocab_size=32000, d_model=1024,
                               num_layers=num_layers, num_heads=16, num_kv_heads=8, head_dim=64,
                               ffn_dim=2816)
  params = sharded_params(config, mesh)
  gigabytes = count_params(config) * 4 / 1e9
  row = {"layers": num_layers, "params_M": count_params(config) / 1e6, "GB": gigabytes}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "glmjax")
    with PeakRss() as rss:
      start = time.perf_counter()
      to_huggingface(params, config, out, max_shard_size="500MB")
      row["export_s"] = time.perf_counter() - start
    row["export_rss_mb"] = rss.growth_mb
    start = time.perf_counter()
    from_huggingface(out)
    row["import_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    row["hf_load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(os.path.join(tmp, "hf"), max_shard_size="500MB")
    row["hf_save_s"] = time.perf_counter() - start
    del model
    shutil.rmtree(os.path.join(tmp, "hf"))
  with PeakRss() as rss:
    host = jax.device_get(params)
  row["device_get_rss_mb"] = rss.growth_mb
  del host, params
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
  print("| layers | params | f32 GB | export s (GB/s) | import s (GB/s) | HF save_pretrained s | "
        "HF from_pretrained s | export peak RSS growth MB | device_get RSS growth MB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for num_layers in args.layers:
    r = run(num_layers, mesh)
    print(f"| {r['layers']} | {r['params_M']:.0f}M | {r['GB']:.2f} | {r['export_s']:.2f} "
          f"({r['GB'] / r['export_s']:.2f}) | {r['import_s']:.2f} ({r['GB'] / r['import_s']:.2f}) | "
          f"{r['hf_save_s']:.2f} | {r['hf_load_s']:.2f} | {r['export_rss_mb']:.0f} | "
          f"{r['device_get_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
