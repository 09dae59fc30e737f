"""`glmjax export`: a `glmjax train` checkpoint -> a HuggingFace / PyTorch folder.

    glmjax export --checkpoint runs/demo --out exported/demo
    glmjax export --checkpoint runs/demo --step 2000 --out exported/demo --dtype bfloat16

The params are restored sharded over this machine's devices (the trainer's own
restore, via glmjax.generate.loading) and written one layer of one tensor at a
time, so the model is never gathered whole on the host.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

TARGET_CHOICES = ("auto", "native", "llama", "glm", "cohere", "gpt_neox", "gpt2", "bloom", "torch")
EPILOG = """\
Targets: auto (default) picks the transformers class that represents the model exactly
(LlamaForCausalLM, GlmForCausalLM / Glm4ForCausalLM, CohereForCausalLM, GPTNeoXForCausalLM,
GPT2LMHeadModel, BloomForCausalLM), else the plain PyTorch reference model shipped as
modeling_glmjax.py; native fails instead of falling back, naming the fields that block each class.
Load the result with transformers.AutoModelForCausalLM.from_pretrained(OUT), or for the reference
model: from modeling_glmjax import GLMJaxForCausalLM; GLMJaxForCausalLM.from_pretrained(OUT).
Exit codes: 0 exported, 2 bad arguments, checkpoint or unsupported architecture.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax export", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="`glmjax train` workdir or its checkpoints/ dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--target", default="auto", choices=TARGET_CHOICES, help="PyTorch class (default auto)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written weights (default: ModelConfig.param_dtype)")
  p.add_argument("--max_shard_size", default="5GB",
                 help="split the weights into files of at most this size (default 5GB)")
  p.add_argument("--tokenizer", default="auto",
                 help="'auto' (the checkpoint's tokenizer/ folder, else the training mixture's "
                      "SentencePiece vocabulary), 'none', a SentencePiece .model file or a folder "
                      "of HuggingFace tokenizer files")
  return p


def mixture_vocabulary(experiment):
  """The SentencePiece vocabulary of the training mixture's targets, or None."""
  import seqio  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import data as data_lib  # pylint: disable=import-outside-toplevel
  data_lib.import_task_modules(experiment.data)
  features = seqio.get_mixture_or_task(experiment.data.mixture).output_features
  vocabulary = features["targets"].vocabulary if "targets" in features else None
  return vocabulary if isinstance(vocabulary, seqio.SentencePieceVocabulary) else None


def resolve_tokenizer(choice: str, checkpoint: str, loaded):
  """(tokenizer for to_huggingface or None, note for the user)."""
  if choice == "none":
    return None, "no tokenizer files (--tokenizer none)"
  if choice != "auto":
    return choice, f"tokenizer from {choice}"
  stored = os.path.join(os.path.abspath(checkpoint), "tokenizer")
  if os.path.isdir(stored):
    return stored, f"tokenizer from {stored}"
  try:
    vocabulary = mixture_vocabulary(loaded.experiment)
  except (ValueError, KeyError, ImportError) as e:
    return None, f"no tokenizer files: the training mixture's vocabulary is unavailable ({e})"
  if vocabulary is None:
    return None, (f"no tokenizer files: mixture {loaded.experiment.data.mixture!r} has no "
                  "SentencePiece vocabulary (pass --tokenizer)")
  if vocabulary.vocab_size > loaded.config.vocab_size:
    return None, (f"no tokenizer files: the mixture's vocabulary ({vocabulary.vocab_size} ids) is "
                  f"larger than ModelConfig.vocab_size={loaded.config.vocab_size}")
  return vocabulary, f"tokenizer: the vocabulary of mixture {loaded.experiment.data.mixture!r}"


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  logging.basicConfig(level=logging.WARNING)
  from glmjax.export import exporter  # pylint: disable=import-outside-toplevel
  from glmjax.generate.loading import load_checkpoint  # pylint: disable=import-outside-toplevel
  try:
    loaded = load_checkpoint(args.checkpoint, args.step)
  except (ValueError, FileNotFoundError) as e:
    print(f"glmjax export: {e}", file=sys.stderr)
    return 2
  tokenizer, note = resolve_tokenizer(args.tokenizer, args.checkpoint, loaded)
  try:
    result = exporter.to_huggingface(loaded.params, loaded.config, args.out, tokenizer=tokenizer,
                                     target=args.target, dtype=args.dtype,
                                     max_shard_size=args.max_shard_size)
  except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
    print(f"glmjax export: {e}", file=sys.stderr)
    return 2
  print(f"glmjax export: step {loaded.step} of {loaded.directory} -> {args.out} as "
        f"{result.architecture} ({len(result.files)} files; {note})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
