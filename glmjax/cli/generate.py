"""`glmjax generate`: text from a trained checkpoint, streamed to the terminal.

    glmjax generate --checkpoint runs/demo --prompt "To be, or not to be"
    glmjax generate --checkpoint runs/demo --prompt "The [MASK] of Venice" --strategy beam
    glmjax generate --checkpoint runs/demo --prompts_file prompts.txt --strategy sample --top_p 0.9
    glmjax generate --checkpoint runs/demo --mode chat          # interactive, multi-turn
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

from glmjax.cli import common

EPILOG = """\
Modes: auto (blank filling when the prompt has [MASK]/[sMASK], else [gMASK] generation),
blank, gmask, text (<sop> + prompt, the causal-LM task format), raw (plain continuation,
for imported HuggingFace models), chat (ChatGLM3 roles; interactive when no --prompt; a run
imported from ChatGLM2/3 prompts with its tokenizer/ and ChatGLM3's own chat template).
A prompts file has one prompt per line ("\\n" inside a line is a newline).
Exit codes: 0 done, 2 bad arguments or checkpoint.
"""


# `glmjax generate` samples by default, as ChatGLM's own chat() does (top_p 0.8, temperature 0.8),
# with CTRL's repetition penalty 1.2 (Keskar et al. 2019): greedy decoding of a small model
# repeats its most frequent token (for the demo model: a newline). `glmjax eval` scores
# generations greedily unless told otherwise.
SAMPLING_DEFAULTS = dict(strategy="sample", temperature=0.8, top_p=0.8, repetition_penalty=1.2)


def add_decoding_args(p: argparse.ArgumentParser, **defaults) -> None:
  """Decoding flags; `defaults` overrides the greedy defaults (e.g. SAMPLING_DEFAULTS)."""
  d = dict(strategy="greedy", temperature=1.0, top_p=1.0, repetition_penalty=1.0)
  d.update(defaults)
  g = p.add_argument_group("decoding")
  g.add_argument("--strategy", choices=("greedy", "sample", "beam"), default=d["strategy"],
                 help=f"default {d['strategy']}")
  g.add_argument("--max_new_tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=d["temperature"], help="sampling only")
  g.add_argument("--top_k", type=int, default=0, help="0 disables")
  g.add_argument("--top_p", type=float, default=d["top_p"], help="1.0 disables")
  g.add_argument("--repetition_penalty", type=float, default=d["repetition_penalty"],
                 help="1.0 disables")
  g.add_argument("--no_repeat_ngram_size", type=int, default=0, help="0 disables")
  g.add_argument("--num_beams", type=int, default=4)
  g.add_argument("--length_penalty", type=float, default=1.0)
  g.add_argument("--forbid", default="", help="comma-separated token ids never to emit")
  g.add_argument("--seed", type=int, default=0)


def add_model_args(p: argparse.ArgumentParser) -> None:
  common.add_checkpoint_args(p)
  p.add_argument("--vocab", default=None,
                 help="SentencePiece model with the GLM specials (default: the shipped vocabulary)")
  p.add_argument("--prompt_layout", choices=("glm", "glm130b", "causal"), default=None,
                 help="how prompts are laid out (default: the checkpoint's ModelConfig.prompt_layout)")
  p.add_argument("--causal_inputs", action="store_const", const=True, default=None,
                 help="Part A causal: the 'causal' prompt layout")
  p.add_argument("--positions_1d", action="store_const", const=True, default=None,
                 help="one position stream without block positions: 'glm130b' with a "
                      "bidirectional Part A, 'causal' with --causal_inputs")


def options_from_args(args):
  from glmjax.generate.decoding import GenerationOptions  # pylint: disable=import-outside-toplevel
  forbid = tuple(int(t) for t in args.forbid.split(",") if t.strip())
  return GenerationOptions(
      max_new_tokens=args.max_new_tokens, strategy=args.strategy, temperature=args.temperature,
      top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
      no_repeat_ngram_size=args.no_repeat_ngram_size, forbidden_ids=forbid,
      num_beams=args.num_beams, length_penalty=args.length_penalty, seed=args.seed)


def prompt_convention(args, model_config, data_config=None, vocabulary=None):
  """The prompt layout the model was trained with: the checkpoint's ModelConfig.prompt_layout
  (checked against explicit DataConfig flags), unless --prompt_layout / --causal_inputs /
  --positions_1d override it."""
  from glmjax.generate import glm  # pylint: disable=import-outside-toplevel
  from glmjax.model.config import LAYOUT_FLAGS, layout_from_flags  # pylint: disable=import-outside-toplevel
  from glmjax.trainer.data import resolve_prompt_layout  # pylint: disable=import-outside-toplevel
  layout = model_config.prompt_layout
  flags = args.causal_inputs is not None or args.positions_1d is not None
  if getattr(args, "prompt_layout", None):
    layout = args.prompt_layout
  elif not flags and data_config is not None:
    try:
      layout = resolve_prompt_layout(data_config, model_config)
    except ValueError as e:
      raise common.BadInput(str(e)) from e
  elif flags:
    bidirectional, one_stream = LAYOUT_FLAGS[layout]
    bidirectional = not args.causal_inputs if args.causal_inputs is not None else bidirectional
    one_stream = args.positions_1d if args.positions_1d is not None else (one_stream or not bidirectional)
    layout = layout_from_flags(bidirectional, one_stream)
  if vocabulary is None:
    return glm.Convention(layout)
  model_config = dataclasses.replace(model_config, prompt_layout=layout)
  return glm.Convention.of(model_config, vocabulary.special_ids, cls_id=_cls_id(vocabulary))


def _cls_id(vocabulary):
  """The vocabulary's [CLS] id (GLM-10B's tokenizer has one; the shipped vocabulary does not)."""
  tokenizer = vocabulary.tokenizer
  i = tokenizer.piece_to_id("[CLS]")
  return None if tokenizer.id_to_piece(i) != "[CLS]" else int(i)


def run_vocabulary(args, loaded):
  """--vocab (a GLMVocabulary) when given; else the run's own tokenizer/ when it is ChatGLM2/3's
  (`glmjax import` of a ChatGLM3-6B folder copies tokenizer.model + tokenizer_config.json
  there): glmjax.tasks.vocab.ChatGLMVocabulary; else the shipped vocabulary."""
  from glmjax.run.directory import TOKENIZER  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  if args.vocab:
    return vocab_lib.GLMVocabulary(args.vocab)
  try:
    chatglm = vocab_lib.chatglm_tokenizer_in(loaded.workdir.file(TOKENIZER))
  except ValueError as e:
    raise common.BadInput(str(e)) from e
  return chatglm if chatglm is not None else vocab_lib.default_vocabulary()


def text_generator(args, prog: str = "glmjax generate"):
  """(LoadedParams, TextGenerator) for the checkpoint named by the model args: params only,
  sharded over this host's devices."""
  from glmjax.generate.text import TextGenerator  # pylint: disable=import-outside-toplevel
  if args.vocab and not os.path.isfile(args.vocab):
    raise common.BadInput(f"--vocab {args.vocab} is not a file; give a SentencePiece .model file")
  loaded = common.load_checkpoint_params(args, prog)
  if getattr(args, "quantize", "none") != "none":  # weight-only: int8 per channel, int4 = NF4 (QLoRA)
    from glmjax.tuning import quant  # pylint: disable=import-outside-toplevel
    loaded.params = quant.quantize_params(loaded.params, loaded.config, quant.CLI_KINDS[args.quantize])
  vocabulary = run_vocabulary(args, loaded)
  if vocabulary.vocab_size > loaded.config.vocab_size:
    raise common.BadInput(f"the vocabulary has {vocabulary.vocab_size} ids but the model only "
                          f"{loaded.config.vocab_size}; pass the --vocab the model was trained with")
  convention = prompt_convention(args, loaded.config, loaded.experiment.data, vocabulary)
  return loaded, TextGenerator(loaded.params, loaded.config, vocabulary, convention,
                               sharding_context=loaded.sharding_context,
                               batch_multiple=loaded.batch_multiple)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="glmjax generate", description=__doc__.split("\n\n")[0],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
  p.add_argument("--prompts_file", default=None, help="file with one prompt per line")
  p.add_argument("--mode", choices=("auto", "blank", "gmask", "text", "raw", "chat"), default="auto")
  p.add_argument("--system", default=None, help="chat: system message")
  p.add_argument("--no_stream", action="store_true", help="print each answer when complete")
  p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                 help="weight-only quantized layer projections: int8 per output channel, int4 = NF4 "
                      "blocks of 64 (QLoRA); the KV cache stays float")
  add_decoding_args(p, **SAMPLING_DEFAULTS)
  common.add_verbose_flag(p)
  return p


def _read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    if not os.path.isfile(args.prompts_file):
      raise common.BadInput(f"--prompts_file {args.prompts_file} is not a file")
    with open(args.prompts_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
  return prompts


def _chat(generator, options, args, prompts) -> None:
  """The conversation, in the vocabulary's template (glmjax.generate.chat: ChatGLM3's own for
  a ChatGLM2/3 tokenizer, whose replies are split into metadata and content as ChatGLM3 does)."""
  from glmjax.generate import chat as chat_lib  # pylint: disable=import-outside-toplevel
  try:
    chat_lib.check_template(generator.ids, generator.convention)
  except ValueError as e:
    raise common.BadInput(str(e)) from e
  history = [chat_lib.Turn("system", args.system)] if args.system else []
  interactive = not prompts
  queries = prompts if prompts else _stdin_lines()
  for query in queries:
    history.append(chat_lib.Turn("user", query))
    if not interactive:
      print(f"user: {query}")
    print("assistant: ", end="", flush=True)
    stream = None if args.no_stream else chat_lib.ReplyStream(
        lambda piece: print(piece, end="", flush=True), generator.ids)
    turns = chat_lib.reply_turns(generator.chat(history, options, on_text=stream), generator.ids)
    answer = chat_lib.shown(turns[-1])
    if stream is not None:
      stream.finish(answer)
    print("" if stream else answer)
    history.extend(turns)


def _stdin_lines():
  while True:
    try:
      line = input("user: ")
    except EOFError:
      return
    if line.strip():
      yield line


def _generate(args) -> int:
  prompts = _read_prompts(args)
  if not prompts and args.mode != "chat":
    raise common.BadInput("give --prompt TEXT or --prompts_file FILE (or --mode chat for a conversation)")
  options = options_from_args(args)
  _, generator = text_generator(args)
  if args.mode == "chat":
    _chat(generator, options, args, prompts)
    return 0
  mode = generator.mode_of(generator.encode(prompts[0]), args.mode)
  for prompt in prompts:
    generator.check_prompt(generator.encode(prompt), mode, options)
  if len(prompts) == 1 and not args.no_stream and args.strategy != "beam" and mode != "blank":
    print(prompts[0], end="", flush=True)
    generator.complete(prompts, options, mode, on_text=lambda piece: print(piece, end="", flush=True))
    print()
    return 0
  answers = generator.complete(prompts, options, mode)
  for prompt, answer in zip(prompts, answers):
    print(f"### {prompt}\n{answer}\n")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.run_parsed("glmjax generate", build_parser(), _generate, argv)
