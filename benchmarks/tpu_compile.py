#!/usr/bin/env python3
"""Presets x TPU topologies at realistic training shapes, compiled ahead of time on this host.

    python benchmarks/tpu_compile.py [--rows llama2-7b/v5p-8 chatglm2-6b-decode/v5e-4] [--list]
                                     [--timeout 1800] [--json OUT] [--maxtext PYTHON]

With --maxtext (an interpreter where `pip install maxtext` worked: MaxText needs Python >= 3.12,
e.g. a venv of pyenv's 3.12) the rows that name a MaxText model also run MaxText's own
`train_compile` at the same shape, and the table puts its per-device GiB beside glmjax's.

Each row runs `glmjax compile` (libtpu, no TPU) in its own process and reads its --json report:
per-device GiB (arguments / temporaries / peak), fits, compile seconds and the roofline MFU
bound (its HBM term the analytic traffic of `glmjax.aot.hbm_traffic`, shown per device per
step). Alongside, the analytic per-device state: (params + gradients + Adam's two moments) /
devices, all in the param dtype (float32), i.e. 16 bytes a parameter (decode: params + KV cache).
It is not a strict floor: XLA may never hold all gradients at once (each layer's update can
follow its gradient inside the backward scan). The training
shapes: bf16 compute over float32 params, full remat (`nothing_saveable`), Pallas flash
attention (the Mosaic kernels), pure FSDP over the slice (MeshConfig.fsdp = -1), one sequence
per chip unless noted. The `-chunked` / `-offload` / `-bf16adam` rows add the memory options
(ModelConfig.loss_impl = 'chunked', remat_policy = 'offload_layer_input', bf16 Adam moments).
Prints a markdown table and a `RESULT_JSON:` line.

Real-size compiles take minutes each on a 2-core host and several GiB of host memory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 1024**3
TRAIN = ["ModelConfig.dtype = 'bfloat16'", "ModelConfig.param_dtype = 'float32'",
         "ModelConfig.remat_policy = 'nothing_saveable'", "ModelConfig.attention_impl = 'auto'",
         "MeshConfig.data = 1", "MeshConfig.fsdp = -1", "OptimizerConfig.name = 'adamw'",
         "TrainerConfig.num_steps = 1000"]

# The vocabulary-chunked cross-entropy: [B, 2048, V] float32 logits at a time, forward and backward.
CHUNKED = ["ModelConfig.loss_impl = 'chunked'", "ModelConfig.loss_chunk_size = 2048"]

# Each layer's input (the residual stream the backward restarts from) kept in host memory.
OFFLOAD = ["ModelConfig.remat_policy = 'offload_layer_input'"]

# Adam's two moments stored in bfloat16 (the update computed in float32).
BF16_ADAM = ["OptimizerConfig.mu_dtype = 'bfloat16'", "OptimizerConfig.nu_dtype = 'bfloat16'"]

# The default rules (glmjax.sharding.mesh.DEFAULT_RULES) with the params' embed axis over fsdp and
# context: under context parallelism every device holds a 1 / (fsdp x context) shard of the state.
CP_RULES = ("MeshConfig.rules = (('batch', ('data', 'fsdp')), ('length', 'context'), "
            "('layers', 'stage'), ('embed', ('fsdp', 'context')), ('heads', 'tensor'), "
            "('kv_heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor'), ('experts', 'expert'))")


def row(name, model, topology, batch, length, *, slices=1, step="train", context=0, extra=(),
        maxtext=None):
  bindings = TRAIN + [f"DataConfig.batch_size = {batch}", f"DataConfig.sequence_length = {length}",
                      f"ModelConfig.max_length = {max(length, context)}"] + list(extra)
  return {"name": name, "gin_file": os.path.join(REPO, "experiments", "models", model),
          "bindings": bindings, "topology": topology, "num_slices": slices, "step": step,
          "context": context, "batch": batch, "length": length, "maxtext": maxtext}


# Google's slice names count TensorCores for v4 / v5p (2 a chip) and chips for v5e.
ROWS = [
    # maxtext: (MaxText model_name, MaxText topology name, per_device_batch_size) of the peer run
    row("llama2-7b/v5p-8", "llama2_7b.gin", "v5p:2x2x1", 4, 4096, maxtext=("llama2-7b", "v5p-8", 1)),
    row("llama2-7b/v5e-16", "llama2_7b.gin", "v5e:4x4", 16, 4096,
        maxtext=("llama2-7b", "v5e-16", 1)),
    row("chatglm2-6b-32k/v5e-16", "chatglm2.gin", "v5e:4x4", 16, 32768),
    row("chatglm2-6b-32k/v5p-8", "chatglm2.gin", "v5p:2x2x1", 4, 32768),
    row("llama2-70b/v5p-64", "llama2_70b.gin", "v5p:4x4x2", 32, 4096,
        maxtext=("llama2-70b", "v5p-64", 1)),
    row("glm-130b/v4-384", "glm130b.gin", "v4:4x4x12", 384, 2048),
    row("glm-130b/v5p-128", "glm130b.gin", "v5p:4x4x4", 64, 2048),
    row("bloom-176b/v5p-128", "bloom.gin", "v5p:4x4x4", 64, 2048,
        extra=["ModelConfig.vocab_size = 250880", "ModelConfig.d_model = 14336",
               "ModelConfig.num_layers = 70", "ModelConfig.num_heads = 112",
               "ModelConfig.num_kv_heads = 112", "ModelConfig.head_dim = 128",
               "ModelConfig.ffn_dim = 57344"]),
    # The memory options of ModelConfig / OptimizerConfig (issue #12's "does not fit" rows).
    row("chatglm2-6b-32k-chunked/v5e-16", "chatglm2.gin", "v5e:4x4", 16, 32768, extra=CHUNKED),
    row("chatglm2-6b-32k-chunked/v5p-8", "chatglm2.gin", "v5p:2x2x1", 4, 32768, extra=CHUNKED),
    row("chatglm2-6b-32k-chunked-offload/v5e-16", "chatglm2.gin", "v5e:4x4", 16, 32768,
        extra=CHUNKED + OFFLOAD),
    row("chatglm2-6b-32k-offload-bf16adam/v5e-16", "chatglm2.gin", "v5e:4x4", 16, 32768,
        extra=OFFLOAD + BF16_ADAM),  # the control: dense logits, the other two options
    row("chatglm2-6b-32k-chunked-offload-bf16adam/v5e-16", "chatglm2.gin", "v5e:4x4", 16, 32768,
        extra=CHUNKED + OFFLOAD + BF16_ADAM),
    # glm-130b on the paper's v4 size: one 2048-token sequence per TensorCore under pure FSDP does
    # not fit (each 1.8B-param layer gathered in bf16 and its float32 gradient unsharded); tensor
    # parallelism 4 (the paper's TP degree) with the batch in 4 microbatches, and the 3D layout
    # (fsdp x tensor x stage, GPipe over 2 stages of 35 layers; 70 layers admit no 4- or 8-stage split).
    row("glm-130b-tp4-mb4/v4-384", "glm130b.gin", "v4:4x4x12", 384, 2048,
        extra=["MeshConfig.tensor = 4", "TrainerConfig.microbatches = 4"]),
    row("glm-130b-tp4-mb4-offload/v4-384", "glm130b.gin", "v4:4x4x12", 384, 2048,
        extra=["MeshConfig.tensor = 4", "TrainerConfig.microbatches = 4"] + OFFLOAD),
    row("glm-130b-3d-tp4-pp2/v4-384", "glm130b.gin", "v4:4x4x12", 384, 2048,
        extra=["MeshConfig.tensor = 4", "MeshConfig.stage = 2", "TrainerConfig.microbatches = 8"]),
    # Context parallelism (MeshConfig.context, ring attention over the sequence): ZeRO-3 over both
    # the fsdp and the context axis (rule embed -> (fsdp, context)), so the params shard 16 / 8 ways.
    row("chatglm2-6b-32k-cp4/v5e-16", "chatglm2.gin", "v5e:4x4", 4, 32768,
        extra=["MeshConfig.fsdp = 4", "MeshConfig.context = 4", CP_RULES] + CHUNKED),
    row("chatglm2-6b-32k-cp4-offload-bf16adam/v5e-16", "chatglm2.gin", "v5e:4x4", 4, 32768,
        extra=["MeshConfig.fsdp = 4", "MeshConfig.context = 4", CP_RULES] + CHUNKED + OFFLOAD
        + BF16_ADAM),
    row("chatglm2-6b-128k-cp8/v5p-32", "chatglm2.gin", "v5p:2x2x4", 2, 131072,
        extra=["MeshConfig.fsdp = 2", "MeshConfig.context = 8", CP_RULES] + CHUNKED),
    row("chatglm2-6b-decode/v5e-4", "chatglm2.gin", "v5e:2x2", 8, 1, step="decode", context=8192,
        extra=["MeshConfig.fsdp = 2", "MeshConfig.tensor = 2"]),  # 2 kv heads: tensor <= 2
]


def state_lower_bound(row_: dict, num_devices: int) -> float:
  """(params + grads + 2 Adam moments) in float32 over the devices; decode: float32 params +
  the bf16 KV cache (k and v, layers x batch x context x kv_heads x head_dim)."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  from glmjax.model import is_spec, param_specs  # pylint: disable=import-outside-toplevel
  config_gin.clear()
  config_gin.parse([row_["gin_file"]], row_["bindings"])
  model = config_gin.build_experiment().model
  config_gin.clear()
  n = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(param_specs(model), is_leaf=is_spec))
  if row_["step"] == "decode":
    kv = 2 * model.num_layers * row_["batch"] * row_["context"] * model.num_kv_heads * model.head_dim
    return (4 * n + 2 * 2 * kv) / num_devices  # k and v, 2 bytes an element
  return 16 * n / num_devices


def run_row(row_: dict, timeout: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    argv = [sys.executable, "-m", "glmjax.cli.main", "compile", "--gin_file", row_["gin_file"],
            "--topology", row_["topology"], "--num_slices", str(row_["num_slices"]),
            "--step", row_["step"], "--json", out]
    if row_["context"]:
      argv += ["--context", str(row_["context"])]
    for binding in row_["bindings"]:
      argv += ["--gin", binding]
    start = time.perf_counter()
    try:
      proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            check=False)
    except subprocess.TimeoutExpired:
      return {"name": row_["name"], "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3) or not os.path.exists(out):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
      return {"name": row_["name"], "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    with open(out, encoding="utf-8") as f:
      report = json.load(f)
  report["name"], report["wall_s"] = row_["name"], round(wall, 1)
  report["shape"] = (f"{row_['batch']} x 1 token, {row_['context']} cached" if row_["step"] == "decode"
                     else f"{row_['batch']} x {row_['length']}")
  report["state_lower_bound_bytes"] = state_lower_bound(row_, report["num_devices"])
  return report


def parse_memory_analysis(text: str):
  """Per-device bytes from the `Memory analysis: CompiledMemoryStats(...)` line MaxText's
  train_compile prints (None when absent); peak as glmjax.aot.per_device_bytes computes it."""
  m = re.search(r"Memory analysis: CompiledMemoryStats\((.*?)\)", text)
  if not m:
    return None
  f = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
  out = {"arguments": f["argument_size_in_bytes"], "temporaries": f["temp_size_in_bytes"],
         "outputs": f["output_size_in_bytes"], "aliased": f["alias_size_in_bytes"],
         "generated_code": f["generated_code_size_in_bytes"]}
  out["peak"] = (out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
                 + out["generated_code"])
  return out


def maxtext_env() -> dict:
  """The environment for MaxText's interpreter: this one's, less TPU_LIBRARY_PATH (importing
  jax here points it at this environment's libtpu, which MaxText's newer jax must not load: its
  Pallas kernels' configs would not parse)."""
  env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  return env


def run_maxtext(row_: dict, python: str, timeout: float) -> dict:
  """The peer: MaxText's `train_compile` (its own interpreter `python`, MaxText >= 3.12) for the
  row's model, topology and tokens per chip, at the same training choices (bf16 compute over
  float32 weights, AdamW, full remat, its default FSDP over the slice, its autoselected (flash)
  attention). Returns {"per_device_bytes", "wall_s"} or {"error"}."""
  model, topology, per_device = row_["maxtext"]
  where = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                         capture_output=True, text=True, check=False)
  if where.returncode:
    return {"error": f"maxtext not importable by {python}: {where.stderr.strip().splitlines()[-1:]}"}
  with tempfile.TemporaryDirectory() as tmp:
    argv = [python, "-m", "maxtext.trainers.pre_train.train_compile",
            os.path.join(where.stdout.strip(), "configs", "base.yml"), f"model_name={model}",
            f"compile_topology={topology}", "compile_topology_num_slices=1",
            f"per_device_batch_size={per_device}", f"max_target_length={row_['length']}",
            "remat_policy=full", "weight_dtype=float32", "dtype=bfloat16", "opt_type=adamw",
            f"base_output_directory={tmp}", "run_name=peer", "enable_checkpointing=false"]
    start = time.perf_counter()
    try:
      proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                            check=False, env=maxtext_env())
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout:.0f} s"}
  memory = parse_memory_analysis(proc.stdout + proc.stderr)
  if memory is None:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
  return {"per_device_bytes": memory, "wall_s": round(time.perf_counter() - start, 1)}



def peer_cell(report: dict) -> str:
  peer = report.get("maxtext")
  if not peer:
    return ""
  if "error" in peer:
    return f"error: {peer['error']}"
  m = peer["per_device_bytes"]
  return f"{m['arguments'] / GiB:.2f} / {m['temporaries'] / GiB:.2f} / {m['peak'] / GiB:.2f}"

def table(reports: list) -> str:
  lines = ["| preset / slice | topology | step: batch x length | args GiB | temps GiB | peak GiB "
           "| HBM GiB | fits | analytic state GiB | compile s | HBM traffic GiB | MFU bound "
           "| MaxText args / temps / peak GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    if "error" in r:
      lines.append(f"| {r['name']} | | | | | | | error: {r['error']} | | | | | |")
      continue
    m = r["per_device_bytes"]
    lines.append(
        f"| {r['name']} | {r['topology']} ({r['num_devices']} x {r['device_kind']}) | {r['step']}: {r['shape']} "
        f"| {m['arguments'] / GiB:.2f} | {m['temporaries'] / GiB:.2f} | {m['peak'] / GiB:.2f} "
        f"| {r['hbm_bytes_per_device'] / GiB:.2f} | {'yes' if r['fits'] else 'NO'} "
        f"| {r['state_lower_bound_bytes'] / GiB:.2f} | {r['compile_s']:.0f} "
        f"| {r['hbm_traffic']['total'] / GiB:.1f} "
        f"| {r['roofline']['mfu_bound']:.0%} ({r['roofline']['bound_by']}) | {peer_cell(r)} |")
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", nargs="*", default=None, help="row names (default: all); see --list")
  p.add_argument("--list", action="store_true", help="print the row names and exit")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
  p.add_argument("--json", default=None, help="also write the reports here")
  p.add_argument("--maxtext", default=None, metavar="PYTHON",
                 help="an interpreter with MaxText installed (it needs Python >= 3.12): also run its "
                      "train_compile for the rows that name a MaxText model")
  args = p.parse_args()
  if args.list:
    print("\n".join(r["name"] for r in ROWS))
    return 0
  chosen = ROWS if not args.rows else [r for r in ROWS if r["name"] in args.rows]
  unknown = set(args.rows or ()) - {r["name"] for r in ROWS}
  if unknown:
    print(f"unknown rows {sorted(unknown)}; see --list", file=sys.stderr)
    return 2
  reports = []
  for r in chosen:
    reports.append(run_row(r, args.timeout))
    if args.maxtext and r["maxtext"] and "error" not in reports[-1]:
      reports[-1]["maxtext"] = run_maxtext(r, args.maxtext, args.timeout)
    print(f"{r['name']}: done", file=sys.stderr, flush=True)
  print(table(reports))
  slim = [{k: v for k, v in r.items() if k != "collectives"} for r in reports]
  print("RESULT_JSON: " + json.dumps(slim))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(reports, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
