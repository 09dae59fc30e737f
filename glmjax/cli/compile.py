"""`glmjax compile`: compile what `glmjax train` runs for a TPU topology, on this host, and report.

    glmjax compile --gin_file experiments/demo.gin --topology v5e:2x2 --json report.json

Ahead of time, with the `libtpu` wheel (`pip install -e '.[tpu]'`) and no TPU: the
same TrainProgram step (shardings, donation, remat policy, Pallas kernels) for
the named slice, from shapes only (no dataset is built). Prints per-device
memory and whether it fits the chip's HBM, compile seconds, analytic FLOPs,
the collectives XLA inserted, and a roofline bound on MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from glmjax.cli import common

EXIT_DOES_NOT_FIT = 3

EPILOG = """\
Topologies: GENERATION:CHIPS as libtpu names them, e.g. v5e:2x2 (v5e-4), v5e:4x4 (v5e-16),
v5p:2x2x2 (v5p-16: 8 chips), v4:2x2x2 (libtpu describes v4 per TensorCore, 2 devices a chip),
v6e:2x2; --num_slices N joins N such slices over DCN (MeshConfig.dcn_data / dcn_fsdp: how many
slices the data / fsdp axes span; by default data spans all of them).
JSON keys: fits, per_device_bytes {arguments, temporaries, outputs, aliased, peak},
hbm_bytes_per_device, num_devices, compile_s, flops_per_step, collectives, roofline,
memory_options (the gin choices that trade memory, below).
Memory options (gin): ModelConfig.loss_impl = 'chunked' with ModelConfig.loss_chunk_size (no
[batch, length, vocab] float32 logits); ModelConfig.remat_policy = a jax.checkpoint_policies
name or glmjax's save_qkv_proj, save_attention, save_out_proj, offload_layer_input,
offload_attention, offload_layer_input_save_qkv, 'save=NAMES;offload=NAMES' (host offload to
pinned_host); OptimizerConfig.mu_dtype / nu_dtype = 'bfloat16'; OptimizerConfig.state_sharding
= 'data'.
Exit codes: 0 fits, 3 does not fit the chip's HBM, 2 bad input (unknown topology, a mesh
that does not divide the slice, a bad gin binding; one line), 1 the compiler failed.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax compile", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_experiment_args(p)
  p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2 or v5p:2x2x2")
  p.add_argument("--num_slices", type=int, default=1,
                 help="slices joined over DCN (data parallel across them; default 1)")
  p.add_argument("--step", choices=("train", "eval", "decode"), default="train",
                 help="the step to compile: train (default), eval, or the KV-cache decode step")
  p.add_argument("--context", type=int, default=0,
                 help="--step decode: KV-cache length (default ModelConfig.max_length)")
  p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
  common.add_verbose_flag(p)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  return common.run("glmjax compile", lambda: _compile(argv), common.wants_verbose(argv))


def _compile(argv: list) -> int:
  args, t5x_bindings = common.parse_experiment_args(build_parser(), argv)
  common.check_output_file(args.json, "--json")
  common.setup_logging(args.verbose)
  from glmjax import aot, config_gin  # pylint: disable=import-outside-toplevel
  try:
    config_gin.parse(args.gin_file, args.gin + t5x_bindings)
    experiment = config_gin.build_experiment()
  except (ValueError, TypeError, IOError) as e:
    raise common.BadInput(f"configuration error: {common.one_line(e)}") from e
  try:
    report = aot.compile_report(experiment, args.topology, num_slices=args.num_slices,
                                step=args.step, context=args.context, verbose=args.verbose)
  except ImportError as e:
    raise common.BadInput(str(e)) from e
  report["gin_files"], report["gin_bindings"] = list(args.gin_file), args.gin + t5x_bindings
  print("\n".join(summary_lines(report)))
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, args.json)
  return 0 if report["fits"] else EXIT_DOES_NOT_FIT


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB under 1 GiB (small experiments)."""
  return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def summary_lines(report: dict) -> list:
  """The human-readable report (the JSON has every number)."""
  mem, roof = report["per_device_bytes"], report["roofline"]
  slices = f", {report['num_slices']} slices" if report["num_slices"] > 1 else ""
  lines = [f"glmjax compile: {report['step']} step for {report['topology']}{slices}: "
           f"{report['num_devices']} x {report['device_kind']}, {_gib(report['hbm_bytes_per_device'])} "
           f"HBM each; compiled in {report['compile_s']:.1f} s",
           f"  per device: arguments {_gib(mem['arguments'])}, temporaries {_gib(mem['temporaries'])}, "
           f"outputs {_gib(mem['outputs'])}, aliased {_gib(mem['aliased'])} -> peak {_gib(mem['peak'])}: "
           + ("fits" if report["fits"] else "does NOT fit")]
  if "memory_options" in report:
    o = report["memory_options"]
    loss = f"chunked ({o['loss_chunk_size']} positions)" if o["loss_impl"] == "chunked" else o["loss_impl"]
    lines.append(f"  options: remat {o['remat_policy']}, loss {loss}, {o['optimizer']} moments "
                 f"{o['mu_dtype']}/{o['nu_dtype']}, state sharded as {o['state_sharding']}")
  if "compiler_message" in report:
    lines.append(f"  compiler: {report['compiler_message']}")
  parts = []
  for kind, row in sorted(report["collectives"].items()):
    where = "/".join(w for w, b in (("ICI", row["ici_bytes"]), ("DCN", row["dcn_bytes"])) if b)
    parts.append(f"{kind} x{row['count']} {_gib(row['bytes'])} {where}".rstrip())
  lines.append("  collectives per step: " + ("; ".join(parts) if parts else "none"))
  lines.append(f"  roofline: {report['flops_per_step']:.3g} FLOPs; compute {roof['compute_s'] * 1e3:.2f} ms, "
               f"HBM {roof['hbm_s'] * 1e3:.2f} ms, ICI {roof['ici_s'] * 1e3:.2f} ms, "
               f"DCN {roof['dcn_s'] * 1e3:.2f} ms -> bound by {roof['bound_by']}, "
               f"MFU <= {roof['mfu_bound']:.0%}")
  return lines


if __name__ == "__main__":
  sys.exit(main())
