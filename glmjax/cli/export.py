"""`glmjax export`: a `glmjax train` checkpoint -> a HuggingFace / PyTorch folder.

    glmjax export --checkpoint runs/demo --out exported/demo
    glmjax export --checkpoint runs/demo --step 2000 --out exported/demo --dtype bfloat16

Only the params are restored (no optimizer state), sharded over this machine's
devices (glmjax.run.load.load_params), and written one layer of one tensor at a
time, so the model is never gathered whole on the host. The folder is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from glmjax.cli import common

TARGET_CHOICES = ("auto", "native", "llama", "glm", "chatglm", "cohere", "gpt_neox", "gpt2", "bloom",
                  "torch")
EPILOG = """\
Targets: auto (default) picks the transformers class that represents the model exactly
(LlamaForCausalLM, GlmForCausalLM / Glm4ForCausalLM, CohereForCausalLM, GPTNeoXForCausalLM,
GPT2LMHeadModel, BloomForCausalLM), else the plain PyTorch reference model shipped as
modeling_glmjax.py; native fails instead of falling back, naming the fields that block each class.
chatglm writes ChatGLM2/3 / GLM-4's own layout (ChatGLMModel: transformer.encoder.layers.N...,
fused query_key_value and dense_h_to_4h, rope_ratio) for ChatGLM's modeling code, vLLM and
chatglm.cpp; its config.json auto_map points at THUDM/chatglm3-6b's modeling code on the hub.
Load the result with transformers.AutoModelForCausalLM.from_pretrained(OUT), and the reference
model with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); model(ids).logits.
The folder is written under a temporary name and swapped in only when complete.
Exit codes: 0 exported, 2 bad arguments, checkpoint or unsupported architecture.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax export", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_checkpoint_args(p)
  p.add_argument("--out", required=True,
                 help="output folder: new, empty, or an earlier glmjax export (replaced whole)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --out even if it holds files glmjax did not write: the folder is "
                      "replaced whole by the new export and those files are deleted (a folder with "
                      "subfolders is never replaced). Without it, --out must be new, empty, or an "
                      "unmodified earlier glmjax export (listed in its glmjax_export.json)")
  p.add_argument("--target", default="auto", choices=TARGET_CHOICES, help="PyTorch class (default auto)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written weights (default: ModelConfig.param_dtype)")
  p.add_argument("--max_shard_size", default="5GB",
                 help="split the weights into files of at most this size (default 5GB)")
  p.add_argument("--tokenizer", default="auto",
                 help="'auto' (the checkpoint's tokenizer/ folder, else the training mixture's "
                      "SentencePiece vocabulary), 'none', a SentencePiece .model file or a folder "
                      "of HuggingFace tokenizer files")
  common.add_verbose_flag(p)
  return p


def mixture_vocabulary(experiment):
  """The SentencePiece vocabulary of the training mixture's targets, or None."""
  import seqio  # pylint: disable=import-outside-toplevel
  from glmjax.tasks.registry import import_task_modules  # pylint: disable=import-outside-toplevel
  import_task_modules(experiment.data.modules)
  features = seqio.get_mixture_or_task(experiment.data.mixture).output_features
  vocabulary = features["targets"].vocabulary if "targets" in features else None
  return vocabulary if isinstance(vocabulary, seqio.SentencePieceVocabulary) else None


def resolve_tokenizer(choice: str, loaded):
  """(tokenizer for to_huggingface or None, note for the user)."""
  if choice == "none":
    return None, "no tokenizer files (--tokenizer none)"
  if choice != "auto":
    return choice, f"tokenizer from {choice}"
  from glmjax.run.directory import TOKENIZER  # pylint: disable=import-outside-toplevel
  stored = loaded.workdir.file(TOKENIZER)
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


def _export(args) -> int:
  from glmjax.export import exporter  # pylint: disable=import-outside-toplevel
  exporter.check_export_arguments(
      args.out, target=args.target, dtype=args.dtype, max_shard_size=args.max_shard_size,
      overwrite=args.overwrite, tokenizer=None if args.tokenizer in ("auto", "none") else args.tokenizer)
  loaded = common.load_checkpoint_params(args, "glmjax export")
  tokenizer, note = resolve_tokenizer(args.tokenizer, loaded)
  result = exporter.to_huggingface(loaded.params, loaded.config, args.out, tokenizer=tokenizer,
                                   target=args.target, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
  print(f"glmjax export: step {loaded.step} of {loaded.directory} -> {args.out} as "
        f"{result.architecture} ({len(result.files)} files; {note})")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.run_parsed("glmjax export", build_parser(), _export, argv)


if __name__ == "__main__":
  sys.exit(main())
