"""`glmjax tokenizer`: train, extend and inspect SentencePiece vocabularies."""

from __future__ import annotations

import argparse
import json
import os
import sys

from glmjax.cli import common


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="glmjax tokenizer",
      description="Train or inspect a SentencePiece vocabulary with GLM's special tokens "
                  "([MASK] [sMASK] [gMASK] <sop> <eop> and the chat roles) as single ids.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{train,add-specials,encode,decode,info}")

  train = sub.add_parser("train", help="Train a SentencePiece model on text or JSONL files.",
                         description="Train a SentencePiece model; JSONL(.gz) files contribute their "
                                     "'text' field, other files every non-empty line.")
  train.add_argument("--input", nargs="+", required=True, metavar="FILE[@N]",
                     help="training files; FILE@N repeats FILE N times (up-weights a small language)")
  train.add_argument("--vocab_size", type=int, required=True, help="total ids, specials included")
  train.add_argument("--out", required=True, help="path of the .model file to write")
  train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
  train.add_argument("--character_coverage", type=float, default=0.9995)

  add = sub.add_parser("add-specials", help="Append missing GLM special tokens to an existing model.",
                       description="Append the GLM special tokens a SentencePiece model lacks "
                                   "(e.g. LLaMA's or Mistral's tokenizer.model) as user-defined pieces.")
  add.add_argument("--model", required=True, help="existing .model file")
  add.add_argument("--out", required=True, help="path of the extended .model file")

  for name, help_ in (("encode", "Text to ids (one line of JSON per input line)."),
                      ("decode", "Ids (JSON list or space separated, one sequence per line) to text.")):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--model", default=None, help="a .model file (default: the shipped vocabulary)")
    p.add_argument("text", nargs="*", help="inputs; read from standard input when omitted")
    if name == "encode":
      p.add_argument("--pieces", action="store_true", help="print pieces instead of ids")

  info = sub.add_parser("info", help="Vocabulary size and special token ids.",
                        description="Print the vocabulary size and the ids of the special tokens.")
  info.add_argument("--model", default=None, help="a .model file (default: the shipped vocabulary)")
  return parser


def _vocabulary(model):
  from glmjax.tasks import vocab  # pylint: disable=import-outside-toplevel
  return vocab.GLMVocabulary(model) if model else vocab.default_vocabulary()


def _inputs(args) -> list[str]:
  return list(args.text) if args.text else [line.rstrip("\n") for line in sys.stdin]


def _parse_ids(line: str) -> list[int]:
  line = line.strip()
  try:
    ids = json.loads(line) if line.startswith("[") else [int(t) for t in line.split()]
  except ValueError as e:
    raise common.BadInput(f"decode: cannot read ids from {line!r}: {e}") from e
  return [int(i) for i in ids]


def main(argv: list[str] | None = None) -> int:
  args = _build_parser().parse_args(argv)
  return common.run("glmjax tokenizer", lambda: _run(args))


def _run(args) -> int:
  for flag in ("model",):
    path = getattr(args, flag, None)
    if path and not os.path.isfile(path):
      raise common.BadInput(f"--{flag} {path} is not a file; give a SentencePiece .model file")
  from glmjax.tasks import vocab  # pylint: disable=import-outside-toplevel
  if args.command == "train":
    path = vocab.train_sentencepiece(args.input, args.vocab_size, args.out, model_type=args.model_type,
                                     character_coverage=args.character_coverage)
    print(f"wrote {path} ({vocab.GLMVocabulary(path).vocab_size} ids)")
  elif args.command == "add-specials":
    added = vocab.add_special_tokens(args.model, args.out)
    print(f"wrote {args.out}; added {added if added else 'nothing (all present)'}")
  elif args.command == "encode":
    tokenizer = _vocabulary(args.model).tokenizer
    for text in _inputs(args):
      out = tokenizer.encode_as_pieces(text) if args.pieces else tokenizer.encode_as_ids(text)
      print(json.dumps(out, ensure_ascii=False))
  elif args.command == "decode":
    tokenizer = _vocabulary(args.model).tokenizer
    for line in _inputs(args):
      if line.strip():
        print(tokenizer.decode_ids(_parse_ids(line)))
  elif args.command == "info":
    v = _vocabulary(args.model)
    print(json.dumps({"model": v.sentencepiece_model_file, "vocab_size": v.vocab_size,
                      "special_ids": {k: val for k, val in vars(v.special_ids).items()}}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
