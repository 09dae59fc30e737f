"""The `glmjax` console script: one subcommand per job, each with its own --help.

Subcommands are resolved lazily so `glmjax tokenizer --help` does not import
the trainer (and JAX's backends) it does not need.
"""

from __future__ import annotations

import importlib
import os
import sys

# TensorFlow (the seqio input pipeline) logs C++ INFO/WARNING lines at import;
# keep the terminal for the job's own output unless the user asks otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SUBCOMMANDS = {
    "train": ("glmjax.train", "Train a model from a gin experiment file."),
    "eval": ("glmjax.evaluate", "Evaluate a checkpoint on tasks (zero/few-shot, CoT, perplexity)."),
    "generate": ("glmjax.generate", "Generate text or fill GLM blanks from a checkpoint."),
    "export": ("glmjax.export", "Export a checkpoint to PyTorch / HuggingFace format."),
    "import": ("glmjax.export.importer", "Import a HuggingFace checkpoint as an orbax checkpoint."),
    "tokenizer": ("glmjax.tasks.tokenizer_cli", "Train or inspect a SentencePiece vocabulary."),
}


def _usage() -> str:
  lines = ["usage: glmjax <command> [options]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  lines += ["", "Run `glmjax <command> --help` for the options of one command."]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"glmjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(SUBCOMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
