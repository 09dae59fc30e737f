"""`glmjax eval`: score a trained checkpoint on tasks; JSON results and a table.

    glmjax eval --checkpoint runs/demo --tasks glmjax_blank_infilling_default
    glmjax eval --checkpoint runs/demo --tasks glmjax_flan --max_examples 100 --output results.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from glmjax.cli import common
from glmjax.cli.generate import add_decoding_args, add_model_args, options_from_args, text_generator

EPILOG = """\
--tasks takes seqio task or mixture names (mixtures expand to their tasks), e.g. the Flan
formats glmjax_flan_arith_{zero_shot,few_shot,cot,few_shot_cot}, glmjax_flan_play_few_shot,
or the blank-infilling validation split of glmjax_blank_infilling_default.
Exit codes: 0 done, 2 bad arguments, tasks or checkpoint.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax eval", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--tasks", required=True, help="comma-separated seqio task / mixture names")
  p.add_argument("--split", default="validation")
  p.add_argument("--module", action="append", default=[],
                 help="Python module to import first (registers your tasks)")
  p.add_argument("--output", default=None, help="write the results as JSON here")
  p.add_argument("--sequence_length", type=int, default=0,
                 help="row length (default: the training rows', within the model's max_length)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_examples", type=int, default=0, help="per QA task; 0: all")
  p.add_argument("--lm_batches", type=int, default=0, help="per LM task; 0: the whole split")
  p.add_argument("--unigram_batches", type=int, default=200,
                 help="train-split batches counted for the unigram baseline")
  p.add_argument("--length_normalize", action="store_true",
                 help="multiple choice: mean instead of summed option log-probability")
  p.add_argument("--score_eop", action="store_true", help="multiple choice: score <eop> after options")
  add_decoding_args(p)
  common.add_verbose_flag(p)
  return p


def _evaluate(args) -> int:
  common.check_output_file(args.output, "--output")
  from glmjax.evaluate import runner  # pylint: disable=import-outside-toplevel
  for module in ["glmjax.tasks"] + list(args.module):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise common.BadInput(f"--module {module}: cannot import it ({e})") from e
  names = runner.expand_tasks([n.strip() for n in args.tasks.split(",") if n.strip()])
  loaded, generator = text_generator(args, "glmjax eval")
  if args.batch_size % generator.batch_multiple:
    raise common.BadInput(f"--batch_size {args.batch_size} must be a multiple of the mesh's "
                          f"{generator.batch_multiple} batch shards")
  config = runner.EvalConfig(
      split=args.split, batch_size=args.batch_size,
      sequence_length=args.sequence_length or min(loaded.experiment.data.sequence_length,
                                                  loaded.config.max_length),
      max_examples=args.max_examples, lm_batches=args.lm_batches,
      unigram_batches=args.unigram_batches, length_normalize=args.length_normalize,
      score_eop=args.score_eop, generation=options_from_args(args))
  results = runner.evaluate(generator, names, config, log=lambda line: print(line, file=sys.stderr))
  results = dict(results, checkpoint=loaded.directory, step=loaded.step)
  print(runner.format_table(results))
  if args.output:
    runner.write_json(results, args.output)
    print(f"results written to {args.output}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.run_parsed("glmjax eval", build_parser(), _evaluate, argv)


__all__ = ["main", "build_parser"]
