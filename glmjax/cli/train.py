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
import dataclasses
import importlib
import sys
from typing import Optional, Sequence

from glmjax.cli import common

EPILOG = """\
Bindings name a config dataclass and a field: ModelConfig, MeshConfig, OptimizerConfig,
DataConfig, TrainerConfig, CheckpointConfig, DistributedConfig (see experiments/*.gin).
Outputs in --workdir: checkpoints/, metrics.jsonl, tensorboard/, loss.png, config.gin, summary.json.
Exit codes: 0 done or preempted (SIGTERM: checkpoint saved), 1 training failed, 2 bad
configuration (one line, before anything compiles), 130 Ctrl-C (checkpoint saved; a second
Ctrl-C aborts at once). Re-running the same command resumes.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax train", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_experiment_args(p)
  p.add_argument("--workdir", default=None,
                 help="run directory: checkpoints, metrics, plots (required; resumes from its newest "
                      "readable checkpoint)")
  p.add_argument("--step", type=int, default=None,
                 help="resume from this checkpoint step; newer steps are moved to "
                      "skipped_checkpoints/ (never deleted)")
  p.add_argument("--module", action="append", default=[], metavar="MODULE",
                 help="Python module to import first, e.g. one that registers your seqio tasks")
  p.add_argument("--print_config", action="store_true", help="print the parsed config and exit")
  common.add_verbose_flag(p)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = common.wants_verbose(argv)
  return common.run("glmjax train", lambda: _train(argv), verbose)


def _train(argv: list) -> int:
  args, t5x_bindings = common.parse_experiment_args(build_parser(), argv)
  common.setup_logging(args.verbose)
  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  for module in args.module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise common.BadInput(f"--module {module}: cannot import it ({e})") from e
  try:
    config_gin.parse(args.gin_file, args.gin + t5x_bindings)
    experiment = config_gin.build_experiment()
  except (ValueError, TypeError, IOError) as e:
    raise common.BadInput(f"configuration error: {common.one_line(e)}") from e
  if not args.workdir and not args.print_config:
    raise common.BadInput("--workdir is required: the folder for checkpoints and metrics, e.g. "
                          "--workdir runs/demo (an existing one resumes)")
  if args.workdir:
    from glmjax.run.directory import check_folder_argument  # pylint: disable=import-outside-toplevel
    check_folder_argument(args.workdir, "--workdir")
  text = config_gin.operative_config()
  if args.print_config:
    print(text)
    return 0
  if args.module:
    experiment = dataclasses.replace(experiment, data=dataclasses.replace(
        experiment.data, modules=tuple(experiment.data.modules) + tuple(args.module)))

  from glmjax.trainer import NonFiniteLossError, train  # pylint: disable=import-outside-toplevel
  try:
    result = train(experiment, args.workdir, config_text=text, resume_step=args.step,
                   log=lambda line: print(f"glmjax train: {line}", file=sys.stderr))
  except NonFiniteLossError as e:
    print(f"glmjax train: {e}", file=sys.stderr)
    return common.EXIT_FAILED
  print(summary_line(result, args.workdir))
  return common.EXIT_INTERRUPTED if result.status == "interrupted" else 0


def summary_line(result, workdir: str) -> str:
  last = next((r for r in reversed(result.records) if r.get("kind") == "train"), None)
  summary = f"glmjax train: {result.status} at step {result.step}"
  if last is not None:
    summary += f", train loss {last['loss']:.4f}"
  last_eval = next((r for r in reversed(result.records) if r.get("kind") == "eval"), None)
  if last_eval is not None:
    summary += f", eval loss {last_eval['eval_loss']:.4f}"
  summary += f"; outputs in {workdir}"
  if result.status == "interrupted":
    summary += " (re-run the same command to resume)"
  return summary


if __name__ == "__main__":
  sys.exit(main())
