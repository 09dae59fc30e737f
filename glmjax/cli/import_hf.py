"""`glmjax import`: a local HuggingFace checkpoint -> a new glmjax run directory.

    glmjax import --from path/to/hf_model --out runs/imported
    glmjax train --gin_file experiments/demo.gin --gin_file runs/imported/model.gin --workdir runs/imported
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from glmjax.cli import common

EPILOG = """\
Writes OUT/model.gin (the ModelConfig: what the model is, not how it runs), OUT/checkpoints/0
(the trainer's checkpoint layout: the imported params, a fresh optimizer state for the
experiment's OptimizerConfig, step 0) and OUT/tokenizer/ (the HuggingFace tokenizer files, when
the folder has them). OUT must be new or empty; it appears only when the import succeeded.
Continue training with the same experiment files, the model file last:

  glmjax train --gin_file my_finetune.gin --gin_file OUT/model.gin --workdir OUT

Exit codes: 0 imported, 2 bad arguments, unsupported or damaged checkpoint, or OUT not empty.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="glmjax import", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Import a local HuggingFace checkpoint as a glmjax train workdir (orbax + gin).")
  p.add_argument("--from", dest="source", required=True,
                 help="checkpoint folder: config.json + safetensors or pytorch_model.bin (single or "
                      "indexed), e.g. from save_pretrained or the HF hub (ChatGLM2/3, GLM-4, "
                      "ChatGLM-6B, GLM-10B / -Large), or a SwissArmyTransformer folder (latest, "
                      "model_config.json, <iteration>/mp_rank_XX_model_states.pt: GLM-130B)")
  p.add_argument("--out", required=True, help="new (or empty) glmjax workdir to write")
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16", "stored"),
                 help="dtype of the imported params (default float32 master weights; 'stored': as saved)")
  p.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                 help="experiment file(s) whose Optimizer/Mesh/Trainer configs the state is built for")
  p.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE", help="gin binding")
  common.add_verbose_flag(p)
  return p


def tokenizer_files(source: str) -> list[str]:
  from glmjax.export.tokenizer_files import HF_TOKENIZER_FILES  # pylint: disable=import-outside-toplevel
  return [os.path.join(source, n) for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]


def _import(args) -> int:
  from glmjax.run import directory, imported  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(args.source):
    raise common.BadInput(f"--from {args.source} is not a folder; give a HuggingFace checkpoint "
                          "folder (config.json + *.safetensors or pytorch_model.bin) or a "
                          "SwissArmyTransformer checkpoint folder")
  directory.check_new_run_folder(args.out)
  from glmjax.export import importer  # pylint: disable=import-outside-toplevel
  dtype = None if args.param_dtype == "stored" else args.param_dtype
  params, config = importer.from_huggingface(args.source, param_dtype=dtype)
  tokenizers = tokenizer_files(args.source)
  out = imported.write_imported_run(params, config, args.out, importer.model_gin(config, args.source),
                                    gin_files=args.gin_file, bindings=args.gin,
                                    tokenizer_files=tokenizers, source=args.source)
  model_gin = os.path.join(args.out, directory.MODEL_GIN)
  print(f"glmjax import: {args.source} -> {out} (step 0, {directory.MODEL_GIN}"
        + (", tokenizer/" if tokenizers else "") + "); continue with: glmjax train --gin_file "
        f"<experiment> --gin_file {model_gin} --workdir {args.out}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.run_parsed("glmjax import", build_parser(), _import, argv)


if __name__ == "__main__":
  sys.exit(main())
