"""Model FLOPs, peak FLOP/s per device kind, and the run's outputs (jsonl, TensorBoard, PNG).

FLOPs per token follow the PaLM appendix B convention the peer benchmark uses:
6 * N + 12 * layers * (heads * head_dim) * seq_len, with N the parameters
that take part in a matmul (the input embedding table is a lookup, so it is
left out unless it doubles as the tied output projection).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from glmjax.model import ModelConfig, is_spec, param_specs

# Dense bf16 peak FLOP/s per chip (vendor data sheets; GPUs without sparsity).
PEAK_FLOPS_BY_KIND = (
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),  # v5e's device_kind
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p's device_kind is "TPU v5" (libtpu topologies); matched after lite
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def matmul_params(config: ModelConfig) -> int:
  """Parameters used in matmuls: all but the input-only lookup tables."""
  specs = param_specs(config)
  lookup = 0
  for name, spec in specs["embed"].items():
    if name == "embedding" and config.tie_embeddings:
      continue
    lookup += spec.size
  total = sum(s.size for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec))
  return total - lookup


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), attention counted non-causally (PaLM)."""
  attention = 12.0 * config.num_layers * config.num_heads * config.head_dim * seq_len
  return 6.0 * matmul_params(config) + attention


def measured_cpu_peak_flops(n: int = 1024, reps: int = 8) -> float:
  """Sustained float32 matmul FLOP/s of this host (median of `reps` n^3 matmuls)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  return 2.0 * n**3 / times[len(times) // 2]


def peak_flops(devices: Sequence[jax.Device], override_per_device: float = 0.0) -> float:
  """Peak FLOP/s of the whole job. CPU: the measured host matmul rate per process (all
  emulated devices of a process share its cores). Unknown accelerators: 0 (MFU not reported)."""
  if override_per_device:
    return override_per_device * len(devices)
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    return measured_cpu_peak_flops() * jax.process_count()
  for name, value in PEAK_FLOPS_BY_KIND:
    if name.lower() in kind.lower():
      return value * len(devices)
  return 0.0


class RunLog:
  """metrics.jsonl + TensorBoard event files in the workdir (process 0 only)."""

  def __init__(self, workdir: Optional[str], enabled: bool = True):
    self.enabled = enabled and workdir is not None
    self.records = []
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.workdir = workdir
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self.records.append(record)
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plain(value):
  if hasattr(value, "item"):
    value = value.item()
  return value


def _ema(values, decay):
  """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
  out, avg = [], 0.0
  for i, v in enumerate(values):
    avg = decay * avg + (1 - decay) * v
    out.append(avg / (1 - decay ** (i + 1)))
  return out


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(records: list[dict], path: str, title: str = "") -> Optional[str]:
  """Train (and eval) loss against step as a PNG; returns the path, or None without data."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("kind") == "train"]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train and not evals:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  if train:
    steps, losses = zip(*train)
    ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.45)
    if len(losses) >= 10:
      ax.plot(steps, _ema(losses, 0.9), label="train loss (EMA 0.9)", linewidth=1.6)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title or "loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
