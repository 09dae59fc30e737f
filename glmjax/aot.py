"""Ahead-of-time compiles for TPU topologies, from any host (`glmjax compile`).

    devices = topology_devices("v5e:2x2")                 # libtpu, no TPU attached
    report = compile_report(experiment, "v5e:2x2")         # the train step, compiled
    report["fits"], report["per_device_bytes"]["peak"]

With the `libtpu` wheel installed, `jax.experimental.topologies` describes a
TPU slice (or several, over DCN) and `jit(...).lower(...).compile()` targets
it: the same XLA TPU compiler and Mosaic kernel compiler a pod runs, so
memory per chip and the collectives XLA inserts are the real ones. What this
module adds: the step `glmjax train` runs (`TrainProgram.lower`, same
shardings, donation, remat policy and attention kernels), the per-device
bytes and whether they fit the chip's HBM, the collectives of the optimized
HLO by kind with their bytes (a scanned layer's collectives counted once per
layer), and a roofline bound.

FLOPs are analytic (`glmjax.trainer.metrics.flops_per_token`): XLA's TPU
`cost_analysis()` counts a scanned layer body once. The chip figures
(`TPU_CHIPS`) are the public per-chip numbers; the roofline takes the step
time as at least the largest of compute at bf16 peak, HBM traffic (analytic,
`hbm_traffic`: the weights each pass reads, the update's reads and writes,
the activations the remat policy saves, the logits) and collective bytes over
ICI / DCN (ring algorithms), so `mfu_bound` is an upper bound on model FLOPs
utilisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Iterator, Optional, Sequence

import numpy as np

GiB = 1024**3

# libtpu's own start-up lines when no TPU is attached (it still compiles fine).
LIBTPU_NOISE = (
    "Failed to find host bounds for accelerator type",
    "WARNING: Logging before InitGoogle() is written to STDERR",
    "could not determine TPU worker hostnames",
    "=== Source Location Trace: ===",
    "libtpu_init_utils.cc",
)


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Per-chip figures (public spec sheets); bandwidths in bytes/s, one direction summed over links."""
  name: str
  hbm_bytes: int
  peak_flops: float  # bf16 dense
  hbm_bandwidth: float
  ici_bandwidth: float
  dcn_bandwidth: float  # per chip: the host's DCN NICs shared by its chips


# Keyed by `device.device_kind` as libtpu reports it (v5p is "TPU v5", v5e "TPU v5 lite").
# hbm_bytes: what the TPU compiler allows per chip (its "available HBM" in out-of-memory errors,
# a little under the spec sheet's 16 / 95 / 32 GiB).
TPU_CHIPS = {
    "TPU v4": ChipSpec("v4", int(30.5 * GiB), 275e12, 1228e9, 300e9, 6.25e9),
    "TPU v5 lite": ChipSpec("v5e", int(15.75 * GiB), 197e12, 819e9, 200e9, 6.25e9),
    "TPU v5": ChipSpec("v5p", int(95.74 * GiB), 459e12, 2765e9, 600e9, 6.25e9),
    "TPU v6 lite": ChipSpec("v6e", int(31.25 * GiB), 918e12, 1640e9, 448e9, 12.5e9),
}

STEPS = ("train", "eval", "decode")


def chip_spec(devices: Sequence) -> ChipSpec:
  """Per-device figures: the chip's, split between its cores where each core is a device (libtpu
  describes v4 per TensorCore, two devices a chip, 15.25 GiB each)."""
  kind = devices[0].device_kind
  if kind not in TPU_CHIPS:
    raise ValueError(f"no chip figures for device kind {kind!r}; known: {', '.join(TPU_CHIPS)}")
  chip = TPU_CHIPS[kind]
  cores = 1 + max(int(getattr(d, "core_on_chip", 0) or 0) for d in devices)
  if cores == 1:
    return chip
  return ChipSpec(f"{chip.name} core", chip.hbm_bytes // cores, chip.peak_flops / cores,
                  chip.hbm_bandwidth / cores, chip.ici_bandwidth / cores, chip.dcn_bandwidth / cores)


# ---------------------------------------------------------------------------------------------
# Topologies


def topology_devices(name: str, num_slices: int = 1, verbose: bool = False) -> list:
  """The devices of TPU topology `name` ("v5e:2x2", "v5p:2x2x2", "v4:2x2x2", "v6e:4x4"), times
  `num_slices` slices over DCN. ValueError (one line, naming the fix) for names libtpu rejects,
  and ImportError when libtpu is not installed."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("libtpu") is None:
    raise ImportError("libtpu is not installed; pip install -e '.[tpu]' (AOT compiles for TPU need "
                      "the TPU compiler, no TPU)")
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--num_slices {num_slices!r} must be a positive int")
  if not re.fullmatch(r"v[0-9][a-z]*:[0-9]+(x[0-9]+){1,2}", name or ""):
    raise ValueError(f"unknown TPU topology {name!r}; give GENERATION:CHIPS like v5e:2x2, v5e:4x4, "
                     "v5p:2x2x2, v4:2x2x2, v6e:2x2")
  # Compiling touches no chip, so other processes holding libtpu's lock (/tmp/libtpu_lockfile)
  # need not block this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from glmjax.quiet import filtered_stderr  # pylint: disable=import-outside-toplevel
  try:
    with filtered_stderr(() if verbose else LIBTPU_NOISE):
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices)
  except Exception as e:  # libtpu's INVALID_ARGUMENT (a JaxRuntimeError)
    message = str(e).split("\n")[0].replace("INVALID_ARGUMENT: ", "")
    raise ValueError(f"TPU topology {name!r}: {message}") from e
  devices = list(desc.devices)
  chip_spec(devices)
  return devices


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
  """JAX's persistent compilation cache off: TPU executables compiled without a TPU client
  cannot be read back (the cache would warn and grow), and compile_s must be a real compile."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once per process whether the cache is in use
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


def slice_index(device) -> int:
  return int(getattr(device, "slice_index", 0) or 0)


# ---------------------------------------------------------------------------------------------
# Collectives in optimized HLO text

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVE_KINDS)
                    + r")(-start)?\(")
# Across slices XLA emits each collective as a send to the megascale (DCN) runtime, e.g.
# send(...), is_host_transfer=true, frontend_attributes={..._xla_megascale_transfer_type="ALL_REDUCE"}
_MEGASCALE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\ssend\(.*"
                        r"_xla_megascale_transfer_type=\"([A-Z_]+)\"")
_MEGASCALE_KINDS = {"ONE_TO_ONE": "collective-permute"}
# Bytes a ring algorithm moves per device, as a multiple of the result's bytes, for group size n.
_WIRE = {"all-reduce": lambda n: 2.0 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
         "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: float(n - 1),
         "collective-permute": lambda n: 1.0, "other-dcn": lambda n: 1.0}
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


def shape_bytes(text: str) -> int:
  """Bytes of an HLO shape (a tuple's elements summed); f8 types count 1 byte."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _expand_iota(text: str) -> np.ndarray:
  """`[4,2]<=[2,4]T(1,0)` (XLA's iota replica groups) -> a [groups, group size] array of ids."""
  m = re.fullmatch(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
  shape = [int(x) for x in m.group(1).split(",")]
  dims = [int(x) for x in m.group(2).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  return ids.reshape(shape[0], -1)


def _expand_mesh(sizes_text: str, axes_text: Optional[str]) -> np.ndarray:
  """`mesh['a'=2,'b'=4] {'b'}`: ids laid out row-major on the mesh, grouped along the listed axes
  (all axes when none are listed)."""
  names, sizes = [], []
  for name, size in re.findall(r"'([^']+)'=([0-9]+)", sizes_text):
    names.append(name)
    sizes.append(int(size))
  ids = np.arange(math.prod(sizes)).reshape(sizes)
  grouped = re.findall(r"'([^']+)'", axes_text) if axes_text else names
  order = [i for i, n in enumerate(names) if n not in grouped] + [names.index(n) for n in grouped]
  return ids.transpose(order).reshape(-1, math.prod(sizes[names.index(n)] for n in grouped))


def replica_groups(line: str, num_devices: int) -> np.ndarray:
  """The [groups, size] device ids an HLO collective line names (all devices when it names none)."""
  m = re.search(r"replica_groups=(mesh\[[^\]]*\])(?:\s*(\{[^}]*\}))?", line)
  if m:
    return _expand_mesh(m.group(1), m.group(2))
  m = re.search(r"replica_groups=(\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?)", line)
  if m:
    return _expand_iota(m.group(1))
  m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
  if m and m.group(1):
    groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    if groups and all(len(g) == len(groups[0]) for g in groups) and groups[0]:
      return np.asarray(groups)
  m = re.search(r"source_target_pairs=\{((?:\{[0-9]+,[0-9]+\},?)*)\}", line)
  if m and m.group(1):
    return np.asarray([[int(a), int(b)] for a, b in re.findall(r"\{([0-9]+),([0-9]+)\}", m.group(1))])
  return np.arange(num_devices).reshape(1, -1)


def _split_computations(hlo: str) -> tuple[dict, Optional[str]]:
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = _COMP_HEADER.match(line) if not line.startswith(" ") else None
    if header:
      name = header.group(2)
      comps[name] = []
      if header.group(1):
        entry = name
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _trip_count(condition_lines: Sequence[str]) -> int:
  """A scan's while loop: its condition compares the counter with one integer constant."""
  consts = [int(c) for line in condition_lines
            for c in re.findall(r"s32\[\][^=]*constant\(([0-9]+)\)", line)]
  return max(consts) if len(consts) == 1 else 1


def computation_multipliers(hlo: str) -> dict:
  """How many times each computation runs per execution (while bodies: their trip counts)."""
  return _multipliers(*_split_computations(hlo))


def _executed_computations(hlo: str) -> list:
  """(name, instruction lines, runs per execution) of every computation that runs."""
  comps, entry = _split_computations(hlo)
  mult = _multipliers(comps, entry)
  return [(name, lines, mult[name]) for name, lines in comps.items() if mult.get(name)]


def _multipliers(comps: dict, entry: Optional[str]) -> dict:
  mult = {}

  def visit(name: str, times: int, depth: int = 0) -> None:
    if name not in comps or depth > 64:
      return
    mult[name] = mult.get(name, 0) + times
    for line in comps[name]:
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
      trips = _trip_count(comps.get(condition.group(1), ())) if (body and condition) else 1
      for key, target in _CALLS.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
          visit(callee, times * (trips if key == "body" else 1), depth + 1)

  if entry is not None:
    visit(entry, 1)
  return mult


def parse_collectives(hlo: str, slice_of: Sequence[int], num_devices: int) -> dict:
  """Collectives of an optimized HLO module by kind: op count and bytes per device per step.

  An op's bytes are its result's (all-gather: the gathered array; reduce-scatter: the shard);
  ops in a while body count once per iteration; async pairs sharing a channel count once.
  `slice_of[i]` is the slice of device id i: an op whose groups span slices runs over DCN.
  Returns {kind: {"count", "bytes", "ici_bytes", "dcn_bytes", "wire_bytes_ici",
  "wire_bytes_dcn"}}, wire bytes being what a ring algorithm moves per device.
  """
  seen: dict = {}
  for comp, lines, times in _executed_computations(hlo):
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        dcn = _MEGASCALE.match(line)
        if dcn:  # a cross-slice collective: a host-transfer send to the megascale runtime
          kind = _MEGASCALE_KINDS.get(dcn.group(2), dcn.group(2).lower().replace("_", "-"))
          first = _SHAPE.search(dcn.group(1))
          nbytes = shape_bytes(first.group(0)) if first else 0
          seen[("dcn", comp, line)] = dict(kind=kind, bytes=nbytes, times=times, groups=None)
        continue
      shape_text, kind, start = m.group(1), m.group(2), m.group(3)
      if start and shape_text.startswith("("):  # (operands..., outputs...): keep the outputs
        parts = _SHAPE.findall(shape_text)
        shape_text = " ".join(f"{d}[{s}]" for d, s in parts[len(parts) // 2:])
      channel = re.search(r"channel_id=([0-9]+)", line)
      key = (kind, channel.group(1)) if channel else (kind, comp, line)
      groups = replica_groups(line, num_devices)
      entry = dict(kind=kind, bytes=shape_bytes(shape_text), times=times, groups=groups)
      if key not in seen or seen[key]["times"] < times:
        seen[key] = entry
  out = {}
  for entry in seen.values():
    kind, nbytes, times, groups = entry["kind"], entry["bytes"], entry["times"], entry["groups"]
    if groups is None:  # megascale transfer: across all slices
      dcn, n = True, max(len(set(slice_of)), 2)
    else:
      slices = np.asarray(slice_of)[np.clip(groups, 0, len(slice_of) - 1)]
      dcn = bool(np.any(slices != slices[:, :1]))
      n = groups.shape[1]
    if kind not in _WIRE:
      kind = "other-dcn"
    wire = _WIRE[kind](n) * nbytes * times
    row = out.setdefault(kind, {"count": 0, "bytes": 0, "ici_bytes": 0, "dcn_bytes": 0,
                                "wire_bytes_ici": 0.0, "wire_bytes_dcn": 0.0})
    row["count"] += times
    row["bytes"] += nbytes * times
    row["dcn_bytes" if dcn else "ici_bytes"] += nbytes * times
    row["wire_bytes_dcn" if dcn else "wire_bytes_ici"] += wire
  return out


_DOT = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*([a-z]+[0-9]*)\[([0-9,]*)\]\S*\s+dot\("
                  r"%?([\w.\-]+),\s*%?([\w.\-]+)\)(.*)$")
_DEFINES = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[a-z]+[0-9]*\[([0-9,]*)\]")


def _dims(attrs: str, key: str) -> tuple:
  m = re.search(key + r"=\{([0-9,]*)\}", attrs)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def parse_dots(hlo: str) -> list:
  """Every `dot` of an optimized HLO module (fused or not), grouped by signature: a list of
  {"dtype", "lhs", "rhs", "out" (shapes), "lhs_contracting", "rhs_contracting", "lhs_batch",
  "rhs_batch" (dimension numbers), "count" (runs per execution: a while body's dots once per
  trip), "flops" (2 x output elements x contracted size, times count)}, most FLOPs first.
  Operand shapes are looked up in the dot's own computation (a fusion's parameters)."""
  rows: dict = {}
  for _, lines, times in _executed_computations(hlo):
    shapes = {}
    for line in lines:
      d = _DEFINES.match(line)
      if d:
        shapes[d.group(1)] = tuple(int(x) for x in d.group(2).split(",") if x)
    for line in lines:
      m = _DOT.match(line)
      if not m or m.group(3) not in shapes or m.group(4) not in shapes:
        continue
      attrs = m.group(5)
      lhs, rhs = shapes[m.group(3)], shapes[m.group(4)]
      out = tuple(int(x) for x in m.group(2).split(",") if x)
      key = (m.group(1), lhs, rhs, out) + tuple(_dims(attrs, k) for k in (
          "lhs_contracting_dims", "rhs_contracting_dims", "lhs_batch_dims", "rhs_batch_dims"))
      rows[key] = rows.get(key, 0) + times
  result = []
  for (dtype, lhs, rhs, out, lc, rc, lb, rb), count in rows.items():
    contracted = math.prod(lhs[i] for i in lc)
    result.append(dict(dtype=dtype, lhs=lhs, rhs=rhs, out=out, lhs_contracting=lc, rhs_contracting=rc,
                       lhs_batch=lb, rhs_batch=rb, count=count,
                       flops=2.0 * math.prod(out) * contracted * count))
  return sorted(result, key=lambda r: -r["flops"])


# ---------------------------------------------------------------------------------------------
# Memory, roofline, the report


def per_device_bytes(memory) -> dict:
  """`compiled.memory_analysis()` as a dict; peak = arguments + outputs + temporaries - aliased
  (donated arguments the outputs reuse) + generated code."""
  arguments = int(memory.argument_size_in_bytes)
  outputs = int(memory.output_size_in_bytes)
  temporaries = int(memory.temp_size_in_bytes)
  aliased = int(memory.alias_size_in_bytes)
  code = int(memory.generated_code_size_in_bytes)
  return {"arguments": arguments, "temporaries": temporaries, "outputs": outputs, "aliased": aliased,
          "generated_code": code, "peak": arguments + outputs + temporaries - aliased + code}


def roofline(flops_per_step: float, num_devices: int, chip: ChipSpec, hbm_bytes: float,
             collectives: dict) -> dict:
  """Lower bounds on the step time (seconds) and the MFU they allow; `hbm_bytes` is one device's
  HBM traffic per step (`hbm_traffic`'s total)."""
  compute = flops_per_step / (num_devices * chip.peak_flops)
  hbm = hbm_bytes / chip.hbm_bandwidth
  ici = sum(r["wire_bytes_ici"] for r in collectives.values()) / chip.ici_bandwidth
  dcn = sum(r["wire_bytes_dcn"] for r in collectives.values()) / chip.dcn_bandwidth
  times = {"compute_s": compute, "hbm_s": hbm, "ici_s": ici, "dcn_s": dcn}
  bound = max(times.values())
  limiter = max(times, key=times.get)[:-2]
  return {**times, "step_s_lower_bound": bound, "bound_by": limiter,
          "mfu_bound": compute / bound if bound > 0 else 0.0}


def itemsize(dtype_name: str) -> int:
  """Bytes of one element of a dtype name ('bfloat16', 'float32', ...)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp.dtype(dtype_name).itemsize


# jax.checkpoint_policies that keep every projection's output (the backward recomputes no matmul).
KEEP_PROJECTIONS = ("none", "everything_saveable", "dots_saveable", "checkpoint_dots",
                    "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def checkpoint_widths(config) -> dict:
  """Elements one token holds per layer under each `checkpoint_name` tag of
  glmjax.model.transformer (CHECKPOINT_NAMES): the block input, q / k / v, the attention output
  before its projection, the two sublayers' outputs."""
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  d = config.d_model
  return {"layer_input": d, "query_proj": q, "key_proj": kv, "value_proj": kv, "attention_out": q,
          "attn_out_proj": d, "mlp_out": d}


def saved_width(config, policy: str) -> int:
  """Elements a token keeps per layer from the forward to the backward under remat `policy`
  (already resolved, not "auto"): the layer input always (the scanned, checkpointed block's
  input is its residual); a named policy adds its saved and offloaded tags (offloaded ones
  still pass through HBM once each way); policies in KEEP_PROJECTIONS keep every tag and the
  MLP's up projection (ffn_dim, twice for a gated MLP)."""
  from glmjax.model import config as config_lib  # pylint: disable=import-outside-toplevel
  widths = checkpoint_widths(config)
  if policy in KEEP_PROJECTIONS:
    gated = 2 if config.ffn_gated else 1
    return sum(widths.values()) + gated * config.ffn_dim
  named = config_lib.named_remat_policy(policy)
  names = {"layer_input"} | (set(named[0]) | set(named[1]) if named else set())
  return sum(widths[n] for n in names)


def hbm_traffic(config, step: str, *, batch: int, length: int, num_devices: int,
                model_shards: int = 1, stages: int = 1, microbatches: int = 1, param_count: int,
                matmul_param_count: int, param_bytes: int, state_bytes_per_device: float = 0.0,
                kv_cache_bytes: float = 0.0) -> dict:
  """One device's HBM bytes per step, term by term: a lower bound on what the step moves (the
  activations inside a layer, which XLA partly keeps in VMEM, are not counted).

  With c = bytes of the compute dtype (ModelConfig.dtype), p = bytes of a param
  (ModelConfig.param_dtype), N = parameters, M = matmul parameters (glmjax.trainer.metrics),
  D devices, S = model_shards (mesh axes the weights stay split over in the matmuls: tensor x
  stage; fsdp gathers them), T = batch x length / (D / S) tokens per device, layers per device
  Lp = num_layers / stages, V vocab, m microbatches (each reads the weights again):

    train:  weights     = m x passes x M x c / S    passes = 3: forward, remat forward, backward
                                                    (2 for a policy in KEEP_PROJECTIONS)
            update      = N / D x (2p + 2p) + 2 x state_bytes_per_device
                          (params read + written, gradients written + read, optimizer state
                          read + written)
            activations = 2 x Lp x T x saved_width(policy) x c   (written forward, read backward)
            logits      = h x T x V / tensor x 4   (float32; h = 4: written + read, their gradient
                          written + read; 6 for the chunked loss, which recomputes them)
    eval:   weights = M x c / S, logits = 2 x T x V / tensor x 4
    decode: weights = M x c / S + N x p / D (the stored params read to cast),
            kv_cache = kv_cache_bytes / D (the whole cache read once), logits batch x V x 4 / D

  `state_bytes_per_device` is the optimizer state's bytes on one device (its shards);
  `kv_cache_bytes` the whole decode cache's (k and v, all layers, rows and slots).
  """
  c = itemsize(config.dtype)
  tensor = max(1, model_shards // max(stages, 1))
  from glmjax.model import config as config_lib  # pylint: disable=import-outside-toplevel
  policy = config_lib.resolve_remat_policy(config.remat_policy, "tpu")
  terms = {}
  if step == "decode":
    terms["weights"] = matmul_param_count * c / model_shards + param_count * param_bytes / num_devices
    terms["kv_cache"] = kv_cache_bytes / num_devices
    terms["logits"] = batch * config.vocab_size * 4 / num_devices
  else:
    tokens = batch * length / (num_devices / model_shards)
    if step == "train":
      passes = 2 if policy in KEEP_PROJECTIONS else 3
      terms["weights"] = microbatches * passes * matmul_param_count * c / model_shards
      terms["update"] = param_count / num_devices * 4 * param_bytes + 2 * state_bytes_per_device
      terms["activations"] = (2 * config.num_layers / stages * tokens * saved_width(config, policy)
                              * c)
      head_passes = 6 if config.loss_impl == "chunked" else 4
    else:
      terms["weights"] = matmul_param_count * c / model_shards
      head_passes = 2
    terms["logits"] = head_passes * tokens * config.vocab_size / tensor * 4
  terms["total"] = sum(terms.values())
  return terms


def step_flops(model_config, step: str, batch_size: int, sequence_length: int,
               context: int = 0) -> float:
  """Analytic FLOPs of one step: train 6N + attention per token (forward + backward), eval a
  third of that, decode 2N + 4 * layers * heads * head_dim * context per new token."""
  from glmjax.trainer.metrics import flops_per_token, matmul_params  # pylint: disable=import-outside-toplevel
  if step == "train":
    return flops_per_token(model_config, sequence_length) * batch_size * sequence_length
  if step == "eval":
    return flops_per_token(model_config, sequence_length) * batch_size * sequence_length / 3.0
  attention = 4.0 * model_config.num_layers * model_config.num_heads * model_config.head_dim * context
  return (2.0 * matmul_params(model_config) + attention) * batch_size


def memory_report(compiled, devices: Sequence, flops: float, compile_s: float,
                  hbm_bytes: float) -> dict:
  """The report of one compiled executable; `devices` in the executable's logical-id order (the
  mesh's devices, flattened), so replica groups map onto slices."""
  chip = chip_spec(devices)
  memory = per_device_bytes(compiled.memory_analysis())
  slices = [slice_index(d) for d in devices]
  collectives = parse_collectives(compiled.as_text(), slices, len(devices))
  return {"chip": chip.name, "device_kind": devices[0].device_kind,
          "num_devices": len(devices), "num_slices": len(set(slices)),
          "hbm_bytes_per_device": chip.hbm_bytes, "per_device_bytes": memory,
          "fits": memory["peak"] <= chip.hbm_bytes, "compile_s": round(compile_s, 2),
          "flops_per_step": flops, "collectives": collectives,
          "roofline": roofline(flops, len(devices), chip, hbm_bytes, collectives)}


def train_program(experiment, devices: Sequence):
  """The TrainProgram `glmjax train` builds for `experiment`, on `devices`."""
  from glmjax.trainer.step import StepConfig, TrainProgram  # pylint: disable=import-outside-toplevel
  data, trainer = experiment.data, experiment.trainer
  if data.sequence_length > experiment.model.max_length:
    raise ValueError(f"DataConfig.sequence_length={data.sequence_length} exceeds "
                     f"ModelConfig.max_length={experiment.model.max_length}; shorten the sequences "
                     "or raise max_length")
  return TrainProgram(experiment.model, experiment.optimizer, experiment.mesh,
                      num_steps=max(trainer.num_steps, 1), global_batch_size=data.batch_size,
                      step_config=StepConfig(microbatches=trainer.microbatches, z_loss=trainer.z_loss),
                      devices=devices)


def compile_report(experiment, topology: str, *, num_slices: int = 1, step: str = "train",
                   context: int = 0, verbose: bool = False) -> dict:
  """Compiles `step` ("train", "eval" or "decode") of `experiment` for `topology`; the report.

  A step the TPU compiler refuses for lack of HBM (RESOURCE_EXHAUSTED) is reported, not raised:
  fits False, temporaries as the compiler counted them, arguments from the input shardings."""
  if step not in STEPS:
    raise ValueError(f"--step {step!r} is not one of {', '.join(STEPS)}")
  devices = topology_devices(topology, num_slices, verbose=verbose)
  state_bytes = 0.0
  if step == "decode":
    lowered, mesh, inputs = lower_decode(experiment, devices, context)
  else:
    program = train_program(experiment, devices)
    lowered, mesh = program.lower(step, experiment.data.sequence_length), program.mesh
    state = program.abstract_state()
    inputs = (input_bytes(state if step == "train" else state["params"], step == "train")
              + input_bytes(program.abstract_batch(experiment.data.sequence_length), False))
    state_bytes = sum(n for n, _ in input_bytes(state["opt_state"], True))
  mesh_devices = list(mesh.devices.flat)
  flops = step_flops(experiment.model, step, experiment.data.batch_size,
                     experiment.data.sequence_length, context or experiment.model.max_length)
  traffic = experiment_hbm_traffic(experiment, step, dict(mesh.shape), len(mesh_devices),
                                   state_bytes, context)
  start = time.perf_counter()
  try:
    with no_persistent_cache():
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report = out_of_memory_report(str(e), inputs, mesh_devices, flops,
                                  time.perf_counter() - start, traffic["total"])
  else:
    report = memory_report(compiled, mesh_devices, flops, time.perf_counter() - start,
                           traffic["total"])
  return {"topology": topology, "step": step, "memory_options": memory_options(experiment),
          **report, "hbm_traffic": traffic}


def experiment_hbm_traffic(experiment, step: str, mesh_shape: dict, num_devices: int,
                           state_bytes_per_device: float, context: int = 0) -> dict:
  """`hbm_traffic` of `experiment`'s step on a mesh of `mesh_shape` (axis -> size)."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax.model import is_spec, param_specs  # pylint: disable=import-outside-toplevel
  from glmjax.trainer.metrics import matmul_params  # pylint: disable=import-outside-toplevel
  config = experiment.model
  stages = int(mesh_shape.get("stage", 1))
  shards = int(mesh_shape.get("tensor", 1)) * stages
  count = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(param_specs(config),
                                                                     is_leaf=is_spec))
  context = context or config.max_length
  kv = (2 * config.num_layers * experiment.data.batch_size * context * config.num_kv_heads
        * config.head_dim * itemsize(config.dtype))
  return hbm_traffic(config, step, batch=experiment.data.batch_size,
                     length=experiment.data.sequence_length, num_devices=num_devices,
                     model_shards=shards, stages=stages,
                     microbatches=experiment.trainer.microbatches if step == "train" else 1,
                     param_count=count,
                     matmul_param_count=matmul_params(config),
                     param_bytes=itemsize(config.param_dtype),
                     state_bytes_per_device=state_bytes_per_device, kv_cache_bytes=kv)


def memory_options(experiment) -> dict:
  """The gin choices that trade memory (ModelConfig / OptimizerConfig), as the report shows them."""
  from glmjax.model import config as config_lib  # pylint: disable=import-outside-toplevel
  model, opt = experiment.model, experiment.optimizer
  # The policy the TPU step runs ("auto" resolves per platform; this compiles for TPU).
  remat = config_lib.resolve_remat_policy(model.remat_policy, "tpu")
  return {"remat_policy": remat, "loss_impl": model.loss_impl,
          "loss_chunk_size": model.loss_chunk_size if model.loss_impl == "chunked" else None,
          "optimizer": opt.name, "mu_dtype": opt.mu_dtype or model.param_dtype,
          "nu_dtype": opt.nu_dtype or model.param_dtype, "state_sharding": opt.state_sharding}


def _size(text: str) -> int:
  units = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
  m = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)i?B?", text.strip())
  return int(float(m.group(1)) * units[m.group(2)]) if m else 0


def input_bytes(abstract, donated: bool) -> list:
  """(per-device bytes, donated) of each ShapeDtypeStruct (with sharding) in tree `abstract`:
  shard shape x itemsize, at least 512 bytes (the TPU's smallest buffer)."""
  import jax  # pylint: disable=import-outside-toplevel
  sizes = []
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    sizes.append((max(512, math.prod(shape) * np.dtype(leaf.dtype).itemsize), donated))
  return sizes


def out_of_memory_report(message: str, inputs: list, devices: Sequence, flops: float,
                         compile_s: float, hbm_bytes: float) -> dict:
  """The report of a compile refused with RESOURCE_EXHAUSTED (no executable to analyse)."""
  chip = chip_spec(devices)
  arguments = sum(n for n, _ in inputs)
  m = re.search(r"HLO temporaries \(([0-9.]+[KMGT]?)\)", message) or re.search(
      r"Used ([0-9.]+[KMGT]?) of", message)
  temporaries = _size(m.group(1)) if m else 0
  state = sum(n for n, d in inputs if d)  # the donated train state comes back in place
  memory = {"arguments": arguments, "temporaries": temporaries, "outputs": state, "aliased": state,
            "generated_code": 0, "peak": max(arguments + temporaries, chip.hbm_bytes + 1)}
  slices = [slice_index(d) for d in devices]
  return {"chip": chip.name, "device_kind": devices[0].device_kind, "num_devices": len(devices),
          "num_slices": len(set(slices)), "hbm_bytes_per_device": chip.hbm_bytes,
          "per_device_bytes": memory, "fits": False, "compile_s": round(compile_s, 2),
          "flops_per_step": flops, "collectives": {},
          "roofline": roofline(flops, len(devices), chip, hbm_bytes, {}),
          "compiler_message": " ".join(message.split())[:500]}


def lower_decode(experiment, devices: Sequence, context: int = 0):
  """(lowered, mesh, input bytes) of one KV-cache decode step as `glmjax generate` runs it: one
  new token per row (`glmjax.model.decode.extend`, last-token logits) against a cache of
  `context` slots (default ModelConfig.max_length), params and cache sharded by the mesh rules,
  the cache donated (updated in place)."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from glmjax.model import decode, init_params  # pylint: disable=import-outside-toplevel

  config, batch = experiment.model, experiment.data.batch_size
  context = context or config.max_length
  if context < 1 or context > config.max_length:
    raise ValueError(f"--context {context} must be in 1..ModelConfig.max_length={config.max_length}")
  mesh = shd.make_mesh(experiment.mesh, devices)
  rules = shd.normalise_rules(experiment.mesh.rules)
  shd.check_divisible("decode batch (DataConfig.batch_size)", (batch,), ("batch",),
                      shd.logical_to_spec(("batch",), rules, mesh), mesh)
  named = lambda axes: jax.sharding.NamedSharding(mesh, shd.logical_to_spec(axes, rules, mesh))  # noqa: E731
  param_shardings = shd.param_shardings(config, mesh, rules)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_shardings)
  cache_shapes = jax.eval_shape(lambda: decode.init_cache(config, batch, context))
  cache = decode.KVCache(
      k=jax.ShapeDtypeStruct(cache_shapes.k.shape, cache_shapes.k.dtype, sharding=named(decode.KV_AXES)),
      v=jax.ShapeDtypeStruct(cache_shapes.v.shape, cache_shapes.v.dtype, sharding=named(decode.KV_AXES)),
      tokens=jax.ShapeDtypeStruct((batch, context), jax.numpy.int32, sharding=named(decode.SLOT_AXES)),
      segment_ids=jax.ShapeDtypeStruct((batch, context), jax.numpy.int32,
                                       sharding=named(decode.SLOT_AXES)),
      bidirectional=jax.ShapeDtypeStruct((batch, context), jax.numpy.int32,
                                         sharding=named(decode.SLOT_AXES)),
      index=jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=shd.replicated(mesh)))
  token = jax.ShapeDtypeStruct((batch, 1), jax.numpy.int32, sharding=named(("batch", None)))
  chunk = {"tokens": token, "positions": token, "block_positions": token, "segment_ids": token}

  def step(params, cache, chunk):
    return decode.extend(params, cache, chunk, config, last_only=True)

  with shd.activation_sharding(mesh, rules):
    lowered = jax.jit(step, donate_argnums=(1,)).lower(params, cache, chunk)
  inputs = input_bytes(params, False) + input_bytes(cache, True) + input_bytes(chunk, False)
  return lowered, mesh, inputs
