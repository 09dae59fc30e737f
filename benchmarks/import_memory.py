"""Import of a GLM-130B-shaped SwissArmyTransformer checkpoint: time and peak host memory.

  python benchmarks/import_memory.py [--layers 2] [--vocab 16384] [--tp 8] [--dir /tmp/x]

Writes a SAT checkpoint at GLM-130B's width (hidden 12288, 96 heads, GEGLU inner 32768,
float16; `--layers` layers, `--vocab` rows of the embedding, random weights) as `--tp`
mp_rank_XX_model_states.pt shards, then imports it three ways, each in a fresh process:

  full     glmjax.export.from_huggingface: the whole params tree in host memory (what
           `glmjax import` does today: glmjax.run.imported.write_imported_run takes the tree);
  leaves   importer.iter_leaves: one group of stacked leaves at a time (a fused tensor and
           the leaves it feeds, all layers), each dropped before the next;
  slices   importer.iter_slices: one checkpoint tensor (merged over the shards) at a time.

Memory is sampled every 5 ms from /proc/self/status: RssAnon (the process's own allocations)
and VmRSS (also the file-backed pages of the memory-mapped shards, which the kernel can drop).
Figures are growth above the level after imports, in MB (1e6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HIDDEN, HEADS, INNER = 12288, 96, 32768  # GLM-130B configs/model_glm_130b.sh


def sat_tensors(layers: int, vocab: int, tp: int):
  """(name, shape of one rank's part) of every tensor, in SAT's names (glm130B_model.py)."""
  d, f = HIDDEN, INNER
  out = [("transformer.word_embeddings.weight", (vocab // tp, d))]
  for i in range(layers):
    p = f"transformer.layers.{i}"
    out += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.input_layernorm.bias", (d,)),
            (f"{p}.attention.query_key_value.weight", (3 * d // tp, d)),
            (f"{p}.attention.query_key_value.bias", (3 * d // tp,)),
            (f"{p}.attention.dense.weight", (d, d // tp)), (f"{p}.attention.dense.bias", (d,)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.post_attention_layernorm.bias", (d,)),
            (f"{p}.mlp.dense_h_to_4h.weight", (2 * f // tp, d)),
            (f"{p}.mlp.dense_h_to_4h.bias", (2 * f // tp,)),
            (f"{p}.mlp.dense_4h_to_h.weight", (d, f // tp)), (f"{p}.mlp.dense_4h_to_h.bias", (d,))]
  return out + [("transformer.final_layernorm.weight", (d,)), ("transformer.final_layernorm.bias", (d,))]


def write_checkpoint(folder: str, layers: int, vocab: int, tp: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.join(folder, "1"), exist_ok=True)
  config = {"model_class": "GLM130B", "num_layers": layers, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "vocab_size": vocab, "inner_hidden_size": INNER,
            "max_sequence_length": 2048, "layernorm_order": "post", "model_parallel_size": tp}
  with open(os.path.join(folder, "model_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, "latest"), "w") as f:
    f.write("1")
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for rank in range(tp):
    module = {name: torch.from_numpy(rng.standard_normal(shape, np.float32).astype(np.float16) * 0.02)
              for name, shape in sat_tensors(layers, vocab, tp)}
    torch.save({"module": module}, os.path.join(folder, "1", f"mp_rank_{rank:02d}_model_states.pt"))
    del module
  return time.perf_counter() - start


class Peak:
  """Peak RssAnon / VmRSS growth (kB in /proc/self/status), sampled in a thread."""

  def __enter__(self):
    self.base = self._read()
    self.peak = dict(self.base)
    self._stop = False
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  @staticmethod
  def _read():
    values = {}
    with open("/proc/self/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
          values[key] = int(rest.split()[0]) * 1000
    return values

  def _sample(self):
    while not self._stop:
      now = self._read()
      self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
      time.sleep(0.005)

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()

  def growth_mb(self, key):
    return (self.peak[key] - self.base[key]) / 1e6


def measure(folder: str, mode: str) -> dict:
  """One import mode in this process: wall seconds and peak memory growth."""
  from glmjax.export import from_huggingface, importer  # pylint: disable=import-outside-toplevel
  import jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  largest = 0
  with Peak() as peak:
    start = time.perf_counter()
    if mode == "full":
      params, _ = from_huggingface(folder, param_dtype=None)
      total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
      largest = max(x.nbytes for x in jax.tree_util.tree_leaves(params))
      del params
    else:
      total = 0
      with importer.open_checkpoint(folder) as (reader, target, config):
        if mode == "leaves":
          for _, leaf in importer.iter_leaves(reader, config, target):
            total += leaf.nbytes
            largest = max(largest, leaf.nbytes)
            del leaf
        else:
          for _, _, piece in importer.iter_slices(reader, config, target):
            total += piece.nbytes
            largest = max(largest, piece.nbytes)
            del piece
    seconds = time.perf_counter() - start
  return {"mode": mode, "seconds": seconds, "anon_mb": peak.growth_mb("RssAnon"),
          "rss_mb": peak.growth_mb("VmRSS"), "params_mb": total / 1e6, "largest_piece_mb": largest / 1e6}


def environment() -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
  flags = fields.get("Flags", "").split()
  simd = [f for f in flags if f.startswith(("avx", "sse4", "fma", "amx", "f16c"))]
  return {"cpu": fields.get("Model name", platform.processor()).strip(), "cores": os.cpu_count(),
          "simd_flags": " ".join(simd), "python": platform.python_version(),
          "numpy": np.__version__, "torch": torch.__version__, "jax": jax.__version__,
          "safetensors": safetensors.__version__}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--tp", type=int, default=8)
  p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
  p.add_argument("--modes", nargs="+", default=["slices", "leaves", "full"])
  p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process: one mode
  args = p.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args.dir, args.measure)))
    return
  folder = args.dir or tempfile.mkdtemp(prefix="glm130b_sat_")
  try:
    write_s = write_checkpoint(folder, args.layers, args.vocab, args.tp)
    on_disk = sum(os.path.getsize(os.path.join(folder, "1", n)) for n in os.listdir(os.path.join(folder, "1")))
    print(json.dumps({"environment": environment()}))
    print(f"checkpoint: {args.layers} layers at GLM-130B width, vocab {args.vocab}, {args.tp} shards, "
          f"{on_disk / 1e6:,.0f} MB on disk (written in {write_s:.0f} s)")
    print("| mode | seconds | peak RssAnon growth MB | peak VmRSS growth MB | largest piece MB | params MB |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
      out = subprocess.run([sys.executable, __file__, "--dir", folder, "--measure", mode],
                           capture_output=True, text=True, check=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      print(f"| {mode} | {r['seconds']:.1f} | {r['anon_mb']:,.0f} | {r['rss_mb']:,.0f} | "
            f"{r['largest_piece_mb']:,.0f} | {r['params_mb']:,.0f} |", flush=True)
  finally:
    if not args.dir:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
