"""Plumbing every `glmjax` subcommand shares: quiet start-up, the exit-code contract, flags.

Exit codes (every command):
  0    done
  1    the job itself failed (a bug or a diverged run; the traceback is printed)
  2    bad input: one line on stderr naming the field, flag or file and the fix,
       before anything expensive runs
  130  stopped by Ctrl-C (`glmjax train` saves a checkpoint first and a re-run resumes;
       a second Ctrl-C aborts at once)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# Exceptions that mean "the user's input (or machine) is wrong". Library code raises ValueError
# with a message naming the field and the fix; OSErrors (a missing file, a full disk) name their file.
USER_ERRORS = (ValueError, OSError)


class BadInput(ValueError):
  """A user mistake found by the CLI itself (a flag, a file)."""


def one_line(error: BaseException) -> str:
  """The message on one line (multi-line library messages are joined with '; ')."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return "; ".join(lines) if lines else type(error).__name__


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="show library logs (TensorFlow, absl, orbax) and full tracebacks")


def wants_verbose(argv: Sequence[str]) -> bool:
  return "--verbose" in argv or os.environ.get("GLMJAX_VERBOSE", "") not in ("", "0")


class _DropGinPathProbes(logging.Filter):
  """gin's Python-path reader (gin/resource_reader.py) logs every include path it probes on the
  root logger, at ERROR ("Path not found") when the probe fails, even though the next search path
  then finds the file: noise for a user running from outside the repository."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.module != "resource_reader"


def setup_logging(verbose: bool) -> None:
  """glmjax's own INFO lines; library loggers at ERROR unless verbose (then INFO, unfiltered)."""
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("glmjax").setLevel(logging.INFO)
  level = logging.INFO if verbose else logging.ERROR
  for noisy in ("absl", "jax", "jax._src", "orbax", "tensorflow", "seqio", "etils", "fsspec"):
    logging.getLogger(noisy).setLevel(level)
  if not verbose:
    for handler in logging.getLogger().handlers:
      if not any(isinstance(f, _DropGinPathProbes) for f in handler.filters):
        handler.addFilter(_DropGinPathProbes())


def run(prog: str, body: Callable[[], int], verbose: bool = False) -> int:
  """Runs a command body under the exit-code contract of the module docstring."""
  try:
    return int(body() or 0)
  except KeyboardInterrupt:
    print(f"\n{prog}: aborted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except USER_ERRORS as e:
    if verbose:
      traceback.print_exc()
    print(f"{prog}: {one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_parsed(prog: str, parser: argparse.ArgumentParser, body: Callable, argv: Optional[Sequence[str]]) -> int:
  """The `main` of a command with a fixed parser: parse argv, set up logging, `run(body(args))`."""
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  setup_logging(args.verbose)
  return run(prog, lambda: body(args), args.verbose)


def add_experiment_args(p: argparse.ArgumentParser) -> None:
  """--gin_file / --gin of the commands that take an experiment (t5x's --gin.KEY=VALUE too, see
  parse_experiment_args)."""
  p.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                 help="gin experiment file (repeatable; later files override earlier ones)")
  p.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE",
                 help="gin binding, e.g. 'TrainerConfig.num_steps=100' (repeatable); "
                      "'--gin.KEY=VALUE' works too")


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


def parse_experiment_args(parser: argparse.ArgumentParser, argv: Sequence[str]):
  """(args, t5x bindings) of a command that takes an experiment (--gin_file / --gin / --gin.K=V)."""
  try:
    argv, t5x_bindings = split_t5x_bindings(argv)
  except ValueError as e:
    raise BadInput(str(e)) from e
  args = parser.parse_args(argv)
  if not args.gin_file and not args.gin and not t5x_bindings:
    parser.print_usage(sys.stderr)
    raise BadInput("give an experiment, e.g. --gin_file experiments/demo.gin")
  return args, t5x_bindings


def check_output_file(path: Optional[str], flag: str) -> None:
  """An output file's folder must exist and the path must not be a folder (checked before the
  work that produces the file, so a typo does not cost a whole evaluation)."""
  if not path:
    return
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise BadInput(f"{flag} {path} is a folder; give a file path")
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise BadInput(f"{flag} {path}: the folder {parent} does not exist; create it first")


# --- the model arguments generate / eval / export share ---------------------------------------

def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="`glmjax train` workdir (or its checkpoints/)")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the newest readable one)")


def load_checkpoint_params(args, prog: str):
  """glmjax.run.load.load_params for --checkpoint / --step, reporting skipped steps on stderr."""
  from glmjax.run.load import load_params  # pylint: disable=import-outside-toplevel
  from glmjax.tuning import reward  # pylint: disable=import-outside-toplevel
  if reward.is_reward_run(args.checkpoint, args.step):
    # Its params are {"model", "head"}: a scalar head, not a language model to sample or export.
    raise BadInput(f"--checkpoint {args.checkpoint}: a reward-model run (RewardConfig.task set); "
                   f"{prog} needs a language-model run, score this one with glmjax eval --checkpoint")
  loaded = load_params(args.checkpoint, args.step, log=lambda line: print(f"{prog}: {line}", file=sys.stderr))
  prefix = loaded.experiment.prefix
  if prefix.enabled and prog != "glmjax generate":
    # Only the KV-cache decoder puts the prefix in front of a row; a full forward (eval scoring,
    # export) would write it over the row's first positions (glmjax.tuning.prefix).
    raise BadInput(f"--checkpoint {args.checkpoint}: a P-Tuning v2 run (PrefixConfig.pre_seq_len="
                   f"{prefix.pre_seq_len}); {prog} does not handle prefix runs yet, glmjax generate does")
  return loaded
