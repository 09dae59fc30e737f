"""The `glmjax` console script: one subcommand per job, each with its own --help.

Subcommands are imported lazily and the runtime is made quiet before JAX or
TensorFlow load, so `glmjax tokenizer --help` starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys

from glmjax.cli import common

SUBCOMMANDS = {
    "train": ("glmjax.cli.train", "Train a model from a gin experiment file."),
    "eval": ("glmjax.cli.evaluate", "Evaluate a checkpoint on tasks (zero/few-shot, CoT, perplexity)."),
    "generate": ("glmjax.cli.generate", "Generate text or fill GLM blanks from a checkpoint."),
    "export": ("glmjax.cli.export", "Export a checkpoint to PyTorch / HuggingFace format."),
    "import": ("glmjax.cli.import_hf", "Import a HuggingFace checkpoint as a glmjax workdir."),
    "tokenizer": ("glmjax.cli.tokenizer", "Train or inspect a SentencePiece vocabulary."),
    "compile": ("glmjax.cli.compile", "AOT-compile the train/decode step for a TPU topology; memory, fits."),
}


def _usage() -> str:
  lines = ["usage: glmjax <command> [options]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  lines += ["", "Run `glmjax <command> --help` for the options of one command; --verbose on any",
            "command shows library logs and tracebacks."]
  return "\n".join(lines)


def main(argv=None) -> int:
  """`argv` None: the process's own command line (the console script; it may re-execute itself
  once with huge-page malloc, `glmjax.hugepages`). A list: called from Python, in this process."""
  from_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"glmjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return common.EXIT_BAD_INPUT
  if from_command_line:
    from glmjax.hugepages import reexec_with_hugepages  # pylint: disable=import-outside-toplevel
    reexec_with_hugepages()
  from glmjax.quiet import quiet_runtime  # pylint: disable=import-outside-toplevel
  quiet_runtime(verbose=common.wants_verbose(rest))
  module = importlib.import_module(SUBCOMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
