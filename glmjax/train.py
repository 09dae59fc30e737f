"""`glmjax train`: train a model from gin experiment files (t5x-style command line).

    glmjax train --gin_file experiments/demo.gin --workdir runs/demo
    glmjax train --gin_file experiments/demo.gin --gin "TrainerConfig.num_steps=50" \\
                 --gin.OptimizerConfig.learning_rate=1e-3 --workdir runs/demo

Re-running with the same --workdir resumes from its latest checkpoint.
Multi-host: run the same command on every host with GLMJAX_COORDINATOR=host0:port,
GLMJAX_NUM_PROCESSES=N and GLMJAX_PROCESS_ID=i (or DistributedConfig.* bindings).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

EPILOG = """\
Bindings name a config dataclass and a field: ModelConfig, MeshConfig, OptimizerConfig,
DataConfig, TrainerConfig, CheckpointConfig, DistributedConfig (see experiments/*.gin).
Outputs in --workdir: checkpoints/, metrics.jsonl, tensorboard/, loss.png, config.gin, summary.json.
Exit codes: 0 done or preempted (SIGTERM, checkpoint saved), 1 training failed, 2 bad configuration.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax train", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                 help="gin experiment file (repeatable; later files override earlier ones)")
  p.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE",
                 help="gin binding, e.g. 'TrainerConfig.num_steps=100' (repeatable); "
                      "'--gin.KEY=VALUE' works too")
  p.add_argument("--workdir", default=None,
                 help="run directory: checkpoints, metrics, plots (resumes if it has checkpoints)")
  p.add_argument("--module", action="append", default=[], metavar="MODULE",
                 help="Python module to import first, e.g. one that registers your seqio tasks")
  p.add_argument("--print_config", action="store_true", help="print the parsed config and exit")
  return p


def split_t5x_bindings(argv: Sequence[str]) -> tuple[list, list]:
  """Pulls t5x-style `--gin.KEY=VALUE` (or `--gin.KEY VALUE`) out of argv."""
  rest, bindings = [], []
  i = 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and len(arg) > len("--gin."):
      body = arg[len("--gin."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg} needs a value: --gin.KEY=VALUE")
        body, i = f"{body}={argv[i + 1]}", i + 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, t5x_bindings = split_t5x_bindings(argv)
  except ValueError as e:
    print(f"glmjax train: {e}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  if not args.gin_file and not args.gin and not t5x_bindings:
    build_parser().print_usage(sys.stderr)
    print("glmjax train: give an experiment, e.g. --gin_file experiments/demo.gin", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  try:
    for module in args.module:
      importlib.import_module(module)
    config_gin.parse(args.gin_file, args.gin + t5x_bindings)
    experiment = config_gin.build_experiment()
  except (ValueError, TypeError, FileNotFoundError, ImportError, IOError) as e:
    print(f"glmjax train: configuration error: {e}", file=sys.stderr)
    return 2
  text = config_gin.operative_config()
  if args.print_config:
    print(text)
    return 0
  if args.module:
    import dataclasses  # pylint: disable=import-outside-toplevel
    experiment = dataclasses.replace(experiment, data=dataclasses.replace(
        experiment.data, modules=tuple(experiment.data.modules) + tuple(args.module)))

  from glmjax.trainer import NonFiniteLossError, train  # pylint: disable=import-outside-toplevel
  try:
    result = train(experiment, args.workdir, config_text=text)
  except NonFiniteLossError as e:
    print(f"glmjax train: {e}", file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"glmjax train: {e}", file=sys.stderr)
    return 2
  last = next((r for r in reversed(result.records) if r.get("kind") == "train"), None)
  summary = f"glmjax train: {result.status} at step {result.step}"
  if last is not None:
    summary += f", train loss {last['loss']:.4f}"
  last_eval = next((r for r in reversed(result.records) if r.get("kind") == "eval"), None)
  if last_eval is not None:
    summary += f", eval loss {last_eval['eval_loss']:.4f}"
  if args.workdir:
    summary += f"; outputs in {args.workdir}"
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
