#!/usr/bin/env python3
"""Train-step throughput on the peer workload "llama-small" (../shared/bench/README.md).

    python benchmarks/train_throughput.py                # one round, ~3-4 minutes on 2 cores
    python benchmarks/train_throughput.py --rounds 2     # alternate the implementations twice
    python benchmarks/train_throughput.py --paired glmjax hf_eager --pairs 8   # A/B, steps alternating

In one run, each in its own process, one after the other:
  matmul peak  ../shared/bench/matmul_peak.py (JAX and torch float32 2048^3)
  glmjax       glmjax.trainer.TrainProgram: the trainer's jitted, sharded, donated step
               (llama-small preset, AdamW, clipping; fresh random tokens each step)
  hf_eager     ../shared/bench/hf_llama_train.py --configs eager:fp32:mkldef
  plain_jax    a plain jitted JAX LLaMA step in this file (Python loop over layers,
               einsum attention, optax AdamW): what a user would write first
Every implementation trains the same shape (vocab 8192, d 512, 8 layers, 8 heads,
4 kv heads, SwiGLU 1408, seq 512, batch 8 = 4096 tokens/step) in float32 with AdamW
(lr 3e-4, b=(0.9, 0.95), wd 0.1, clip 1.0). FLOPs/token = 6N + 12*layers*d*seq
(N without the input embedding). Reported: median step time over the timed steps,
tokens/s, MFU against the run's JAX and torch matmul peaks, and the ratio to HF eager.
The last line is `RESULT_JSON: {...}`.

Paired mode (`--paired A B`): both implementations are alive at once, each in its own
process, warmed up, then driven one step at a time, A B, B A, A B, ... so load drift on a
shared machine hits both alike; each pair gives the ratio t_B / t_A (A's speed over B's), and
the median ratio is the last printed figure. hf_eager there is the same HF LlamaForCausalLM
step as ../shared/bench/hf_llama_train.py (config, AdamW, clip) driven by this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), "shared", "bench")
VOCAB, D, LAYERS, HEADS, KV, HEAD_DIM, FFN, SEQ, BATCH = 8192, 512, 8, 8, 4, 64, 1408, 512, 8
TOKENS = BATCH * SEQ


def flops_per_token() -> float:
  attn = D * HEADS * HEAD_DIM * 2 + D * KV * HEAD_DIM * 2
  per_layer = attn + 3 * D * FFN + 2 * D
  n_matmul = LAYERS * per_layer + D + D * VOCAB
  return 6.0 * n_matmul + 12.0 * LAYERS * HEADS * HEAD_DIM * SEQ


def result_line(payload: dict) -> None:
  print("RESULT_JSON: " + json.dumps(payload), flush=True)


def parse_result(output: str) -> dict:
  lines = [l for l in output.splitlines() if l.startswith("RESULT_JSON: ")]
  if not lines:
    raise RuntimeError("no RESULT_JSON in output:\n" + "\n".join(output.splitlines()[-30:]))
  return json.loads(lines[-1][len("RESULT_JSON: "):])


def run(cmd: list, env=None) -> dict:
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-30:]))
  return parse_result(proc.stdout)


# --- children ---------------------------------------------------------------------------------

def _time_steps(step, warmup: int, steps: int, per_call: int = 1):
  """Runs warmup + steps calls of step(i) -> float(loss), each `per_call` train steps (the time
  recorded is per train step); an in-run 2048^3 JAX matmul reference after each one sees the
  same contention as the step."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()

  def ref():
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      mm(a).block_until_ready()
      times.append(time.perf_counter() - t0)
    return 2.0 * 2048**3 / statistics.median(times) / 1e9

  times, losses, refs = [], [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    losses.append(step(i))
    times.append((time.perf_counter() - t0) / per_call)
    refs.append(ref())
  return times, losses, refs


def _summary(impl: str, times, losses, refs, warmup: int, extra: dict) -> dict:
  timed = times[warmup:]
  med = statistics.median(timed)
  achieved = flops_per_token() * TOKENS / med / 1e9
  ref = statistics.median(refs[warmup:])
  return dict(impl=impl, step_median_s=med, step_min_s=min(timed), step_times=timed, warmup_times=times[:warmup],
              tokens_per_s=TOKENS / med, achieved_gflops=achieved, ref_gflops=ref, mfu_vs_inrun_ref=achieved / ref,
              loss_first=losses[0], loss_last=losses[-1], loadavg=os.getloadavg(), **extra)


def random_tokens(i: int):
  import numpy as np
  return np.random.default_rng(1234 + i).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)


def glmjax_program(args):
  """The glmjax llama-small TrainProgram the "glmjax" and "matmul_step" children run."""
  sys.path.insert(0, args.code or REPO)  # --code: another checkout's glmjax (@rev=), this harness
  import jax

  from glmjax.model import presets
  from glmjax.sharding import MeshConfig
  from glmjax.trainer import OptimizerConfig, StepConfig, TrainProgram
  from glmjax.trainer.metrics import flops_per_token as glmjax_flops

  config = dataclasses.replace(presets.get("llama-small"), remat_policy=args.remat, attention_impl=args.attention)
  assert abs(glmjax_flops(config, SEQ) - flops_per_token()) < 1.0, "FLOPs formula differs from the peers'"
  optimizer = OptimizerConfig(learning_rate=3e-4, schedule="constant", b1=0.9, b2=0.95, eps=1e-8,
                              weight_decay=0.1, grad_clip_norm=1.0)
  return TrainProgram(config, optimizer, MeshConfig(data=1), num_steps=1000, global_batch_size=BATCH,
                      step_config=StepConfig(), devices=jax.devices()[:1])


def glmjax_host_batch(i: int) -> dict:
  import numpy as np
  tokens = random_tokens(i)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def child_glmjax(args) -> None:
  import jax

  program = glmjax_program(args)
  per_call = glmjax_steps_per_call(args, program)
  t0 = time.perf_counter()
  state = {"s": program.init_state(0)}
  init_s = time.perf_counter() - t0

  def host_batch(i):
    host = glmjax_host_batch(i)
    if args.fields == "all":  # every optional field written out, as the trainer's data pipeline does
      from glmjax.model import batch as batch_lib  # pylint: disable=import-outside-toplevel
      host = batch_lib.with_defaults(host)
    return host

  def step(i):
    if per_call == 1:
      state["s"], metrics = program.train_step(state["s"], program.global_batch(host_batch(i)))
      return float(metrics["loss"])
    batches = [program.global_batch(host_batch(i * per_call + j)) for j in range(per_call)]
    state["s"], metrics = program.train_steps(state["s"], batches)
    return float(metrics["loss"][-1])

  info = dict(impl="glmjax", remat=args.remat, attention=args.attention, steps_per_call=per_call)
  if args.serve:
    return serve(step, args.warmup, info, per_call)
  times, losses, refs = _time_steps(step, args.warmup, args.steps, per_call)
  extra = dict(info, init_s=init_s, xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__)
  del extra["impl"]
  if args.profile:
    extra["profile"] = profile_breakdown(lambda: step(args.warmup + args.steps), compiled_step_hlo(program))
  result_line(_summary("glmjax", times, losses, refs, args.warmup, extra))


def glmjax_steps_per_call(args, program) -> int:
  """Train steps per jitted call: --steps-per-call, "auto" as `glmjax train` resolves it for a
  long run on this backend (glmjax.trainer.step.resolve_steps_per_call); 1 for a checkout
  (@rev=) from before TrainProgram.train_steps."""
  if not hasattr(program, "train_steps"):
    return 1
  from glmjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel
  value = args.steps_per_call if args.steps_per_call == "auto" else int(args.steps_per_call)
  return step_lib.resolve_steps_per_call(value, program.platform(), program.mesh.size, num_steps=1000)


def compiled_step_hlo(program) -> str:
  """The optimized HLO text of the program's train step (what XLA runs)."""
  batch = program.global_batch(glmjax_host_batch(0))
  with program.sharding_context():
    return program._step.lower(program.abstract_state(), batch).compile().as_text()  # pylint: disable=protected-access


def step_dots_replica(dots: list):
  """A jitted function running every dot of `dots` (glmjax.aot.parse_dots of a step) `count`
  times, one after the other and nothing else: the time the step's own matmuls take alone.

  Each signature's dots run in a `fori_loop` (operands random, one pair per signature) whose
  right operand's first element is replaced, in place, by 0 * the previous output's first
  element: every dot depends on the one before it, so none is hoisted, merged (CSE) or
  overlapped with another, and a loop's output is carried out whole. Returns (fn, operands)."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  key = jax.random.PRNGKey(0)
  operands = []
  for i, dot in enumerate(dots):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dot["dtype"]]
    operands.append((jax.random.normal(k1, dot["lhs"], dtype), jax.random.normal(k2, dot["rhs"], dtype)))

  def run_all(operands):
    link = jnp.zeros((), jnp.float32)  # the previous dot's first output element, times 0
    for dot, (lhs, rhs) in zip(dots, operands):
      numbers = ((dot["lhs_contracting"], dot["rhs_contracting"]), (dot["lhs_batch"], dot["rhs_batch"]))
      first = (0,) * rhs.ndim

      def body(_, carry, lhs=lhs, numbers=numbers, first=first):
        rhs, link = carry
        rhs = rhs.at[first].set(rhs[first] + 0.0 * link.astype(rhs.dtype))
        out = lax.dot_general(lhs, rhs, numbers)
        return rhs, out.reshape(-1)[0].astype(jnp.float32) + 0.0 * jnp.sum(out[(0,) * (out.ndim - 1)])

      _, link = lax.fori_loop(0, dot["count"], body, (rhs, link))
    return link

  return jax.jit(run_all), operands


def child_matmul_step(args) -> None:
  """The glmjax step's own dots alone (step_dots_replica of its compiled HLO): the matmul limit
  of this workload on this machine at the step's shapes, to pair with the glmjax step."""
  sys.path.insert(0, args.code or REPO)
  from glmjax import aot

  dots = aot.parse_dots(compiled_step_hlo(glmjax_program(args)))
  fn, operands = step_dots_replica(dots)

  def step(i):
    return float(fn(operands))

  serve(step, max(args.warmup, 2), dict(impl="matmul_step", gflops_per_step=sum(d["flops"] for d in dots) / 1e9,
                                        dots=sum(d["count"] for d in dots), signatures=len(dots)))


PROFILE_CATEGORIES = ("matmul: projections, MLP, logits", "matmul: attention (batched, K=64)",
                      "attention softmax / mask (L x L elementwise)", "scan residuals (stack, slice, zero-fill)",
                      "other (norms, RoPE, SwiGLU, loss, optimizer, copies)")


def _category(name: str, hlo: str) -> str:
  import re
  match = re.search(r"\n\s*(?:ROOT )?%" + re.escape(name) + r" = \(?\w+\[([\d,]*)\]", hlo)
  dims = [int(d) for d in match.group(1).split(",") if d] if match else []
  if name.startswith(("ynn_fusion", "dot")):
    return PROFILE_CATEGORIES[1] if len(dims) >= 4 else PROFILE_CATEGORIES[0]
  if any(key in name for key in ("dynamic-update-slice", "dynamic-slice", "wrapped_broadcast")):
    return PROFILE_CATEGORIES[3]
  if len(dims) >= 4 and dims[-1] == SEQ and dims[-2] in (SEQ, SEQ * HEADS // KV):
    return PROFILE_CATEGORIES[2]
  return PROFILE_CATEGORIES[4]


def profile_breakdown(step, hlo: str) -> dict:
  """Per-category share of XLA op time in one traced step (jax.profiler, CPU thunk events)."""
  import collections
  import glob
  import tempfile
  import jax
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True)[0])
  seconds = collections.Counter()
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if event.name.startswith(("Thunk", "Slinky", "end:", "ThreadpoolListener")):
          continue
        seconds[_category(event.name, hlo)] += event.duration_ns / 1e9
        per_op[event.name] += event.duration_ns / 1e9
  total = sum(seconds.values())
  top = [dict(op=name, seconds=t, share=t / total, hlo=_hlo_line(name, hlo))
         for name, t in per_op.most_common(TOP_OPS)]
  return {"wall_s": wall, "op_seconds": total,
          "share": {c: seconds[c] / total for c in PROFILE_CATEGORIES}, "top_ops": top}


TOP_OPS = 30


def _hlo_line(name: str, hlo: str) -> str:
  """The HLO instruction defining `name` (its shape and operands), shortened."""
  import re
  match = re.search(r"\n\s*(?:ROOT )?%" + re.escape(name) + r" = ([^\n]*)", hlo)
  return match.group(1)[:160] if match else ""


def plain_jax_model():
  """A LLaMA train step as one would first write it in JAX (no scan, no remat, 3-D einsums)."""
  import jax
  import jax.numpy as jnp
  import optax

  def init(key):
    keys = iter(jax.random.split(key, 4 + 7 * LAYERS))
    normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    layers = [dict(wq=normal((D, HEADS, HEAD_DIM)), wk=normal((D, KV, HEAD_DIM)), wv=normal((D, KV, HEAD_DIM)),
                   wo=normal((HEADS, HEAD_DIM, D)), w_gate=normal((D, FFN)), w_up=normal((D, FFN)),
                   w_down=normal((FFN, D)), attn_norm=jnp.ones((D,)), mlp_norm=jnp.ones((D,)))
              for _ in range(LAYERS)]
    return dict(embed=normal((VOCAB, D)), layers=layers, final_norm=jnp.ones((D,)), lm_head=normal((D, VOCAB)))

  def rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w

  def rope(x):
    half = HEAD_DIM // 2
    inv = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang = jnp.arange(SEQ, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def loss_fn(params, tokens, targets):
    x = params["embed"][tokens]
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    for p in params["layers"]:
      h = rms(x, p["attn_norm"])
      q = rope(jnp.einsum("bld,dhk->blhk", h, p["wq"]))
      k = rope(jnp.einsum("bld,dhk->blhk", h, p["wk"]))
      v = jnp.einsum("bld,dhk->blhk", h, p["wv"])
      k, v = jnp.repeat(k, HEADS // KV, axis=2), jnp.repeat(v, HEADS // KV, axis=2)
      s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(HEAD_DIM).astype(jnp.float32)
      s = jnp.where(causal[None, None], s, -1e30)
      o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
      x = x + jnp.einsum("blhk,hkd->bld", o, p["wo"])
      h = rms(x, p["mlp_norm"])
      x = x + jnp.einsum("blf,fd->bld", jax.nn.silu(jnp.einsum("bld,df->blf", h, p["w_gate"]))
                         * jnp.einsum("bld,df->blf", h, p["w_up"]), p["w_down"])
    logits = jnp.einsum("bld,dv->blv", rms(x, params["final_norm"]), params["lm_head"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))

  @jax.jit
  def train_step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return init, optimizer, train_step


def child_plain_jax(args) -> None:
  import jax
  init, optimizer, train_step = plain_jax_model()
  params = init(jax.random.PRNGKey(0))
  state = {"p": params, "o": optimizer.init(params)}

  def step(i):
    tokens = random_tokens(i)
    state["p"], state["o"], loss = train_step(state["p"], state["o"], tokens[:, :-1], tokens[:, 1:])
    return float(loss)

  if args.serve:
    return serve(step, args.warmup, dict(impl="plain_jax"))
  times, losses, refs = _time_steps(step, args.warmup, args.steps)
  result_line(_summary("plain_jax", times, losses, refs, args.warmup, dict(jax=jax.__version__)))


def peak_rss_mib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(step, warmup: int, info: dict, per_call: int = 1) -> None:
  """Paired mode's child: warm up, print READY, then per request line "step [N]" on stdin run
  N train steps back to back (calls of step(i), each `per_call` train steps; at least one
  call) and answer "STEP <seconds> <loss> <CPU seconds>" per train step, until "quit"; last
  line RESULT_JSON with peak RSS."""
  for i in range(warmup):
    step(i)
  import resource
  print("READY", flush=True)
  i = warmup
  faults = []
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] != "step":
      break
    calls = max(1, (int(words[1]) if len(words) > 1 else 1) // per_call)
    t0, c0 = time.perf_counter(), time.process_time()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
      loss = step(i)
      i += 1
    n = calls * per_call
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n)
    print(f"STEP {(time.perf_counter() - t0) / n:.6f} {loss:.6f} {(time.process_time() - c0) / n:.6f}",
          flush=True)
  result_line(dict(info, peak_rss_mib=peak_rss_mib(), steps=i,
                   minor_faults_per_step=statistics.median(faults) if faults else None,
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES", "")))


def child_hf_eager(args) -> None:
  """HF LlamaForCausalLM float32 eager step, set up as ../shared/bench/hf_llama_train.py does
  (same LlamaConfig, sdpa attention, torch AdamW, clip_grad_norm_ 1.0; labels = inputs)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                    max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                    use_cache=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    initializer_range=0.02)
  cfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
  model = LlamaForCausalLM(cfg).float()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

  def step(i):
    x = torch.from_numpy(random_tokens(i)[:, :SEQ].astype("int64"))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  serve(step, args.warmup, dict(impl="hf_eager", torch=torch.__version__, threads=torch.get_num_threads()))


def child_matmul(args) -> None:
  """A 'step' of 4 float32 2048^3 matmuls in JAX or torch: the in-run matmul rate to pair with."""
  n, reps = 2048, 4
  if args.child == "matmul_torch":
    import torch
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

    def step(i):
      for _ in range(reps):
        torch.matmul(a, b, out=out)
      return 0.0
  else:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)

    def step(i):
      for _ in range(reps):
        mm(a).block_until_ready()
      return 0.0
  serve(step, max(args.warmup, 2), dict(impl=args.child, gflops_per_step=2.0 * n**3 * reps / 1e9))


# Paired-mode names may carry an environment variant: "glmjax@avx2" runs the child with XLA and
# ATen capped at AVX2 (on jax 0.10.2 the XLA cap does not lower the float32 dot rate: YNNPACK
# picks its kernels by cpuid; see BENCHMARKS.md), "@onednn" with XLA's oneDNN dot custom calls,
# "@xla=FLAG=VALUE+FLAG=VALUE" with any XLA flags (names without the leading "--"),
# "@env=NAME=VALUE+NAME=VALUE" with environment variables set.
ISA_ENV = {"avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
           "onednn": {"XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=true"}}
PAIRED_IMPLS = ("glmjax", "hf_eager", "plain_jax", "matmul_jax", "matmul_torch", "matmul_step")


def _parse_paired(text: str) -> tuple[str, dict, str]:
  """"impl[,key=value...][@isa]" -> (impl, glmjax option overrides, isa)."""
  spec, _, isa = text.partition("@")
  impl, *options = spec.split(",")
  overrides = dict(option.split("=", 1) for option in options if "=" in option)
  bad = [o for o in options if "=" not in o]
  bad += [k for k in overrides if k not in ("remat", "attention", "fields", "steps_per_call")]
  bad += [v for k, v in overrides.items() if k == "fields" and v not in ("given", "all")]
  known_isa = not isa or isa in ISA_ENV or isa.startswith(("rev=", "xla=", "env="))
  if impl not in PAIRED_IMPLS or not known_isa or bad or (overrides and impl != "glmjax"):
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected IMPL[,remat=POLICY][,attention=IMPL][,fields=given|all][,steps_per_call=N|auto][@{'|'.join(ISA_ENV)}|@rev=GITREV|@xla=FLAG=V+FLAG=V|@env=NAME=V+NAME=V] with IMPL in {PAIRED_IMPLS} "
        "(remat / attention only for glmjax)")
  return impl, overrides, isa


def paired_name(text: str) -> str:
  _parse_paired(text)
  return text


def checkout_of(rev: str) -> str:
  """A git worktree of this repository at `rev` (made once under /tmp), for before/after pairs."""
  sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, text=True,
                       stdout=subprocess.PIPE).stdout.strip()
  path = os.path.join("/tmp", f"glmjax-bench-{sha}")
  if not os.path.isdir(path):
    subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return path


def _child_command(name: str, args) -> tuple[list, dict]:
  impl, overrides, isa = _parse_paired(name)
  script = os.path.abspath(__file__)
  code = []
  if isa.startswith("rev="):  # another commit's glmjax (or its whole script for the other impls)
    checkout = checkout_of(isa[len("rev="):])
    if impl == "glmjax":
      code = ["--code", checkout]  # this harness (its timing, CPU time) on that commit's model code
    else:
      script = os.path.join(checkout, "benchmarks", "train_throughput.py")
    isa = ""
  me = [sys.executable, script, "--warmup", str(args.warmup), "--serve", "--child", impl] + code
  if impl == "glmjax":
    me += ["--remat", overrides.get("remat", args.remat), "--attention", overrides.get("attention", args.attention)]
    if overrides.get("fields") == "all":
      me += ["--fields", "all"]
    me += ["--steps-per-call", overrides.get("steps_per_call", args.steps_per_call)]
  env = dict(os.environ)
  if isa.startswith("xla="):  # extra XLA flags, '+'-separated, without the leading '--'
    flags = " ".join("--" + flag for flag in isa[len("xla="):].split("+") if flag)
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))
  elif isa.startswith("env="):  # extra environment variables, '+'-separated NAME=VALUE
    env.update(item.split("=", 1) for item in isa[len("env="):].split("+") if item)
  elif isa:
    env.update(ISA_ENV[isa])
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), ISA_ENV[isa]["XLA_FLAGS"]]))
  if impl in ("glmjax", "matmul_step"):
    env = as_glmjax_command_runs(env)
  return me, env


def as_glmjax_command_runs(env: dict) -> dict:
  """The environment `glmjax train` gives itself: with GLMJAX_MALLOC_HUGEPAGES=1 huge-page malloc
  (glmjax.hugepages, opt-in; e.g. `--paired glmjax@env=GLMJAX_MALLOC_HUGEPAGES=1 glmjax`)."""
  sys.path.insert(0, REPO)
  from glmjax import hugepages  # pylint: disable=import-outside-toplevel
  return hugepages.environment_with_hugepages(env) or env


def _gflop_per_step(name: str, final: dict) -> float:
  return final.get("gflops_per_step", flops_per_token() * TOKENS / 1e9)


class _Server:
  """One paired-mode child process."""

  def __init__(self, impl: str, args):
    self.impl = impl
    command, env = _child_command(impl, args)
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    self.log: list = []

  def _read_until(self, prefix: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line
      self.log.append(line)
    raise RuntimeError(f"{self.impl} child ended before {prefix!r}:\n" + "".join(self.log[-30:]))

  def ready(self) -> None:
    self._read_until("READY")

  def step(self, block: int = 1) -> tuple[float, float, float]:
    """`block` train steps back to back: (wall seconds, loss, CPU seconds of the child; NaN from
    an older checkout's child), per train step."""
    self.proc.stdin.write("step\n" if block == 1 else f"step {block}\n")
    self.proc.stdin.flush()
    _, seconds, loss, *cpu = self._read_until("STEP ").split()
    return float(seconds), float(loss), float(cpu[0]) if cpu else float("nan")

  def close(self) -> dict:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    result = parse_result(self._read_until("RESULT_JSON: "))
    self.proc.wait()
    return result


def paired_block(args) -> int:
  """Train steps per turn in paired mode: --block, or "auto": the least common multiple of the
  glmjax sides' steps per call (so a side that runs several steps per call and one that runs
  one are both timed over the same back-to-back steps, as a training run runs them)."""
  if args.block != "auto":
    return int(args.block)
  sys.path.insert(0, REPO)
  from glmjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel
  block = 1
  for name in args.paired:
    impl, overrides, isa = _parse_paired(name)
    if impl == "glmjax" and not isa.startswith("rev="):
      value = overrides.get("steps_per_call", args.steps_per_call)
      block = math.lcm(block, step_lib.CPU_STEPS_PER_CALL if value == "auto" else int(value))
  return block


def paired(args) -> None:
  """A/B with both alive; prints per-pair times and the median ratio (A's tokens/s over B's) last."""
  a_name, b_name = args.paired
  t_start = time.perf_counter()
  block = paired_block(args)
  servers = {name: _Server(name, args) for name in (a_name, b_name)}
  try:
    for server in servers.values():
      server.ready()
    print(f"both warm after {time.perf_counter() - t_start:.0f} s; {args.pairs} pairs of {block} "
          f"train step(s) back to back on each side (load {os.getloadavg()[0]:.1f})", flush=True)
    times = {a_name: [], b_name: []}
    cpu = {a_name: [], b_name: []}
    ratios, cpu_ratios = [], []
    for pair in range(args.pairs):
      order = (a_name, b_name) if pair % 2 == 0 else (b_name, a_name)
      for name in order:
        time.sleep(args.settle)  # let the other process's worker threads stop spinning first
        seconds, _, cpu_seconds = servers[name].step(block)
        times[name].append(seconds)
        cpu[name].append(cpu_seconds)
      ratios.append(times[b_name][-1] / times[a_name][-1])
      cpu_ratios.append(cpu[b_name][-1] / cpu[a_name][-1])
      print(f"pair {pair}: {a_name} {times[a_name][-1]:.2f} s, {b_name} {times[b_name][-1]:.2f} s, "
            f"ratio {ratios[-1]:.3f}; CPU time ratio {cpu_ratios[-1]:.3f} (load {os.getloadavg()[0]:.1f})",
            flush=True)
    finals = {name: server.close() for name, server in servers.items()}
  finally:
    for server in servers.values():
      if server.proc.poll() is None:
        server.proc.kill()
  rates = {}
  for name in (a_name, b_name):
    med = statistics.median(times[name])
    rates[name] = [_gflop_per_step(name, finals[name]) / t for t in times[name]]
    tokens = f"{TOKENS / med:.0f} tokens/s, " if "gflops_per_step" not in finals[name] else ""
    faults = finals[name].get("minor_faults_per_step")
    print(f"{name:10s} median step {med:.3f} s, {tokens}{statistics.median(rates[name]):.0f} GFLOP/s, "
          f"peak RSS {finals[name]['peak_rss_mib']:.0f} MiB"
          + (f", {faults:.0f} minor page faults/step" if faults is not None else ""))
  ratio = statistics.median(ratios)
  rate_ratio = statistics.median(ra / rb for ra, rb in zip(rates[a_name], rates[b_name]))
  result_line(dict(paired=[a_name, b_name], ratios=ratios, times=times, cpu_seconds=cpu, finals=finals,
                   remat=args.remat, attention=args.attention, xla_flags=os.environ.get("XLA_FLAGS", ""),
                   wall_s=time.perf_counter() - t_start))
  print(f"median GFLOP/s ratio {a_name} / {b_name}: {rate_ratio:.3f}")
  if not any(map(math.isnan, cpu_ratios)):  # the work per step, less sensitive to other load than wall time
    print(f"median CPU-time ratio {a_name} / {b_name}: {statistics.median(cpu_ratios):.3f} "
          f"(range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
  print(f"median ratio {a_name} / {b_name} (step speed) over {len(ratios)} pairs: {ratio:.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})", flush=True)


# --- driver -----------------------------------------------------------------------------------

def measure(impl: str, args, peak_jax: float) -> dict:
  me = [sys.executable, os.path.abspath(__file__), "--warmup", str(args.warmup), "--steps", str(args.steps)]
  if impl == "glmjax":
    return run(me + ["--child", "glmjax", "--remat", args.remat, "--attention", args.attention]
               + (["--profile"] if args.profile else []), env=as_glmjax_command_runs(dict(os.environ)))
  if impl == "plain_jax":
    return run(me + ["--child", "plain_jax"])
  if impl == "hf_eager":
    r = run([sys.executable, os.path.join(PEERS, "hf_llama_train.py"), "--configs", "eager:fp32:mkldef",
             "--warmup", str(args.warmup), "--steps", str(args.steps), "--peak-gflops", f"{peak_jax:.1f}"])
    r["impl"] = "hf_eager"
    return r
  raise ValueError(impl)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--impls", nargs="+", default=["glmjax", "hf_eager", "plain_jax"])
  parser.add_argument("--remat", default="auto",
                      help="glmjax ModelConfig.remat_policy (default: the preset's, 'auto': on CPU save "
                           "matmul outputs, recompute the rest)")
  parser.add_argument("--attention", default="auto",
                      help="glmjax ModelConfig.attention_impl (default: the preset's, 'auto': dense on CPU)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace one glmjax step and print where its XLA op time goes")
  parser.add_argument("--paired", nargs=2, metavar=("A", "B"), type=paired_name,
                      help=f"A/B mode: both alive, steps alternating; prints the median ratio A/B last. "
                           f"A, B in {PAIRED_IMPLS}, each optionally ,remat=POLICY ,attention=IMPL ,fields=all ,steps_per_call=N (glmjax) and "
                           f"@{'|'.join(ISA_ENV)} (an environment variant: AVX2 cap, XLA oneDNN dots) or "
                           f"@rev=GITREV (that commit's code, from a git worktree under /tmp) or "
                           f"@xla=FLAG=VALUE+FLAG=VALUE (extra XLA flags, no leading --) or "
                           f"@env=NAME=VALUE+NAME=VALUE (environment variables)")
  parser.add_argument("--pairs", type=int, default=6)
  parser.add_argument("--block", default="auto",
                      help="paired mode: train steps each side runs back to back per turn (times are "
                           "per step); 'auto': the glmjax sides' steps per call (4 by default on CPU)")
  parser.add_argument("--settle", type=float, default=0.5,
                      help="paired mode: seconds of idle before each step, so that the step that "
                           "just ended (its thread pool spinning on, ~50 ms measured after a glmjax "
                           "step) does not slow the next one")
  parser.add_argument("--child", choices=PAIRED_IMPLS, help=argparse.SUPPRESS)
  parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--code", help=argparse.SUPPRESS)
  parser.add_argument("--steps-per-call", default="auto",
                      help="glmjax train steps per jitted call (TrainerConfig.steps_per_call; default "
                           "'auto', as `glmjax train` runs a long run: 4 on one CPU device); times "
                           "are per train step")
  parser.add_argument("--fields", choices=("given", "all"), default="given",
                      help="glmjax batch: tokens/targets/loss_mask only (given), or every optional field "
                           "written out with its default (all: what the trainer's data pipeline passes)")
  args = parser.parse_args()
  if args.child:
    return {"glmjax": child_glmjax, "plain_jax": child_plain_jax, "hf_eager": child_hf_eager,
            "matmul_jax": child_matmul, "matmul_torch": child_matmul,
            "matmul_step": child_matmul_step}[args.child](args)
  if args.paired:
    return paired(args)

  t_start = time.perf_counter()
  load_start = os.getloadavg()
  print(f"load average at start: {load_start}", flush=True)
  peak = run([sys.executable, os.path.join(PEERS, "matmul_peak.py"), "--sizes", "2048", "--dtypes", "float32",
              "--min-time", "2"])
  by_fw = {r["framework"]: r["gflops_median"] for r in peak["results"]}
  peak_jax, peak_torch = by_fw["jax"], by_fw["torch"]
  print(f"matmul peak float32: jax {peak_jax:.0f} GFLOP/s, torch {peak_torch:.0f} GFLOP/s", flush=True)
  results = {impl: [] for impl in args.impls}
  for round_index in range(args.rounds):
    order = args.impls if round_index % 2 == 0 else list(reversed(args.impls))
    for impl in order:
      r = measure(impl, args, peak_jax)
      results[impl].append(r)
      print(f"round {round_index}: {impl:10s} {r['tokens_per_s']:7.1f} tokens/s, step {r['step_median_s']:.2f} s "
            f"(load {os.getloadavg()[0]:.1f})", flush=True)

  fpt = flops_per_token()
  rows = {}
  for impl, runs in results.items():
    tps = statistics.median(r["tokens_per_s"] for r in runs)
    rows[impl] = dict(tokens_per_s=tps, step_s=TOKENS / tps, mfu_jax_peak=fpt * tps / 1e9 / peak_jax,
                      mfu_torch_peak=fpt * tps / 1e9 / peak_torch,
                      mfu_inrun_ref=statistics.median(r["mfu_vs_inrun_ref"] for r in runs), runs=len(runs))
  base = rows.get("hf_eager", {}).get("tokens_per_s")
  print(f"\nFLOPs/token {fpt / 1e6:.1f} M; {TOKENS} tokens/step; matmul peak jax {peak_jax:.0f}, "
        f"torch {peak_torch:.0f} GFLOP/s; load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
  print("| implementation | tokens/s | step (s) | MFU vs JAX matmul peak | MFU vs torch matmul peak "
        "| MFU vs in-run matmul | vs HF eager |")
  print("|---|---|---|---|---|---|---|")
  for impl, row in rows.items():
    ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else "-"
    print(f"| {impl} | {row['tokens_per_s']:.0f} | {row['step_s']:.2f} | {100 * row['mfu_jax_peak']:.0f}% "
          f"| {100 * row['mfu_torch_peak']:.0f}% | {100 * row['mfu_inrun_ref']:.0f}% | {ratio} |")
  profiles = [r["profile"] for r in results.get("glmjax", []) if "profile" in r]
  if profiles:
    print("\nglmjax step, share of XLA op time (one traced step):")
    for category in PROFILE_CATEGORIES:
      print(f"| {category} | {100 * statistics.median(p['share'][category] for p in profiles):.0f}% |")
    print(f"\nglmjax step, the {TOP_OPS} longest XLA ops (first traced step):")
    for op in profiles[0]["top_ops"]:
      print(f"| {100 * op['share']:.1f}% | {op['seconds'] * 1e3:.0f} ms | {op['op']} | {op['hlo'][:110]} |")
  print(f"total wall {time.perf_counter() - t_start:.0f} s")
  result_line(dict(flops_per_token=fpt, tokens_per_step=TOKENS, peak_jax_gflops=peak_jax,
                   peak_torch_gflops=peak_torch, rows=rows, runs=results, loadavg_start=load_start,
                   loadavg_end=os.getloadavg(), remat=args.remat, attention=args.attention))


if __name__ == "__main__":
  main()
