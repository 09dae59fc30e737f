"""Decode speed: glmjax's KV-cache loop vs full recompute vs HuggingFace `generate`.

One LLaMA-style model (a preset, random weights) is exported with
`glmjax.export.to_huggingface` and loaded as transformers' LlamaForCausalLM,
so all runs decode the same weights. Greedy decoding of `--new_tokens`
tokens after a `--prompt_len`-token prompt, no stop token; tokens/s counts
generated tokens (batch x new tokens) over the wall time of the whole call,
prefill included. The methods take turns for `--repeats` rounds after one
untimed call each (compilation / warm-up); the table shows the best round
(the JSON also has the median): the machine is shared and its load moves.

    python benchmarks/decode.py                     # llama-small, batch 1 and 8
    python benchmarks/decode.py --preset tiny-llama --new_tokens 16 --batch 1

Runs:
  glmjax KV cache      glmjax.generate.generate (prefill + jitted lax.while_loop)
  glmjax recompute     a jitted lax.fori_loop that runs the full forward over the
                       [batch, prompt + new] buffer at every step (no cache)
  HF generate          transformers LlamaForCausalLM.generate with its KV cache, with the
                       default attention (sdpa) and attn_implementation="eager", each with
                       1 and 2 torch threads; the table shows the fastest of the four
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glmjax.generate import GenerationOptions, generate  # noqa: E402
from glmjax.model import forward, init_params, presets  # noqa: E402


def time_interleaved(methods: dict, repeats: int) -> tuple[dict, dict]:
  """Best and median wall time of each method over `repeats` rounds, the methods taking
  turns within a round (a shared machine's load then hits all of them alike). One untimed
  call of each first (compilation, warm-up). Returns ({name: (best, median)}, {name: output})."""
  outputs = {name: fn() for name, fn in methods.items()}
  times = {name: [] for name in methods}
  for _ in range(repeats):
    for name, fn in methods.items():
      start = time.perf_counter()
      outputs[name] = fn()
      times[name].append(time.perf_counter() - start)
  return {n: (min(t), statistics.median(t)) for n, t in times.items()}, outputs


@functools.partial(jax.jit, static_argnames=("config", "new_tokens"))
def recompute_generate(params, prompt, *, config, new_tokens):
  """Greedy decoding without a cache: the whole forward at every step."""
  B, P = prompt.shape
  L = P + new_tokens
  tokens = jnp.zeros((B, L), jnp.int32).at[:, :P].set(prompt)
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

  def step(t, tokens):
    length = P + t
    segment_ids = jnp.broadcast_to((jnp.arange(L) < length).astype(jnp.int32), (B, L))
    logits = forward(params, {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}, config)
    last = jax.lax.dynamic_slice(logits, (0, length - 1, 0), (B, 1, logits.shape[-1]))[:, 0]
    return jax.lax.dynamic_update_slice(tokens, jnp.argmax(last, -1).astype(jnp.int32)[:, None],
                                        (0, length))

  return jax.lax.fori_loop(0, new_tokens, step, tokens)[:, P:]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="llama-small")
  p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_recompute", action="store_true")
  p.add_argument("--torch_threads", default="1,2",
                 help="torch intra-op thread counts tried for HF (its OpenMP threads can stall "
                      "badly when the machine's cores are shared)")
  p.add_argument("--json", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from glmjax.export import to_huggingface  # pylint: disable=import-outside-toplevel

  config = presets.get(args.preset)
  params = init_params(config, jax.random.key(0))
  export_dir = tempfile.TemporaryDirectory()  # pylint: disable=consider-using-with
  result = to_huggingface(params, config, export_dir.name)
  print(f"model {args.preset} ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params) "
        f"exported as {result.architecture}; torch threads {torch.get_num_threads()}, "
        f"jax devices {jax.devices()}", flush=True)

  hf_models = {impl: transformers.AutoModelForCausalLM.from_pretrained(
      export_dir.name, dtype=torch.float32, attn_implementation=impl).eval()
                for impl in ("sdpa", "eager")}
  torch_threads = [int(t) for t in args.torch_threads.split(",")]
  rows = []
  N = args.new_tokens
  for B in [int(b) for b in args.batch.split(",")]:
    rng = np.random.default_rng(B)
    prompt = rng.integers(3, config.vocab_size, (B, args.prompt_len)).astype(np.int32)
    options = GenerationOptions(max_new_tokens=N)

    def hf_run(impl, threads, prompt=prompt):
      torch.set_num_threads(threads)
      with torch.no_grad():
        out = hf_models[impl].generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=N,
                                       min_new_tokens=N, do_sample=False, use_cache=True,
                                       pad_token_id=0, eos_token_id=None)
      return out[:, args.prompt_len:].numpy()

    methods = {"glmjax_cache": lambda prompt=prompt: generate(params, config, prompt.tolist(), options).tokens}
    for impl in ("sdpa", "eager"):
      for threads in torch_threads:
        methods[f"hf_{impl}_t{threads}"] = functools.partial(hf_run, impl, threads)
    if not args.skip_recompute:
      methods["glmjax_recompute"] = lambda prompt=prompt: np.asarray(recompute_generate(
          params, jnp.asarray(prompt), config=config, new_tokens=N))
    times, outputs = time_interleaved(methods, args.repeats)
    row = {"batch": B, "prompt_len": args.prompt_len, "new_tokens": N}
    for name, (best, median) in times.items():
      row[f"{name}_tok_s"] = B * N / best
      row[f"{name}_tok_s_median"] = B * N / median
    for name in methods:
      if name != "glmjax_cache":
        row[f"tokens_equal_{name}"] = float(np.mean(outputs["glmjax_cache"] == outputs[name]))
    rows.append(row)
    print(json.dumps(row), flush=True)

  print("\n| batch | glmjax KV cache tok/s | glmjax recompute tok/s | best HF generate tok/s "
        "(attention, torch threads) | cache / recompute | cache / HF |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    re_ = r.get("glmjax_recompute_tok_s", float("nan"))
    hf_name = max((k for k in r if k.startswith("hf_") and k.endswith("_tok_s")), key=r.get)
    impl, threads = hf_name.split("_")[1], hf_name.split("_")[2][1:]
    print(f"| {r['batch']} | {r['glmjax_cache_tok_s']:.0f} | {re_:.0f} | {r[hf_name]:.0f} "
          f"({impl}, {threads}) | {r['glmjax_cache_tok_s'] / re_:.1f}x | "
          f"{r['glmjax_cache_tok_s'] / r[hf_name]:.2f}x |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
