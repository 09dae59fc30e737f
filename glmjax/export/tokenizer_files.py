"""Tokenizer files beside exported weights.

A SentencePiece vocabulary (glmjax's own, a seqio SentencePieceVocabulary or a
`.model` file) is written as `tokenizer.model` plus an equivalent fast
`tokenizer.json`, built here with the `tokenizers` library, so that
`AutoTokenizer.from_pretrained(out)` encodes and decodes exactly as
`SentencePieceProcessor.EncodeAsIds` / `DecodeIds` (what glmjax's tasks used
on the training data):

  normalizer   Prepend("▁") (SentencePiece's dummy prefix, once per text) and
               spaces -> "▁" (identity normalization otherwise);
  pre-tokens   the text split around user-defined symbols (GLM's [MASK],
               [gMASK], <sop>, roles, "\\n"), which SentencePiece also never
               merges across; a pre-token that is a whole piece maps to it
               (`ignore_merges`, which needs every piece to encode to itself
               in SentencePiece: checked at export);
  model        the same BPE pieces with byte fallback, merges ordered by the
               merged piece's score (SentencePiece merges the best-scoring pair);
  special      control symbols (<pad>, </s>) as special added tokens;
  decoder      "▁" -> " ", byte fallback, fuse, strip the dummy prefix.

No BOS/EOS is added on encode (`add_bos_token` / `add_eos_token` false).
A folder of HuggingFace tokenizer files is copied as is.
"""

from __future__ import annotations

import json
import os
import re
import shutil

# The last two are the SentencePiece models of ChatGLM-6B (tokenization_chatglm.py
# vocab_files_names) and GLM-Large-Chinese / GLM-10B-Chinese (tokenization_glm.py); ChatGLM2/3
# name theirs tokenizer.model, GLM-10B (GPT-2 BPE) vocab.json + merges.txt.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                      "ice_text.model", "cog-pretrain.model")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
BPE = 2  # TrainerSpec.ModelType
SPACE = "\u2581"


def check(tokenizer) -> None:
  """What can be checked before an export writes anything: that `tokenizer` is None, an existing
  SentencePiece file, a folder with HuggingFace tokenizer files, model bytes or a vocabulary.
  (Whether a SentencePiece model is exportable exactly is checked while writing it.)"""
  if tokenizer is None or isinstance(tokenizer, (bytes, bytearray)) or hasattr(tokenizer, "sp_model"):
    return
  if not isinstance(tokenizer, (str, os.PathLike)):
    sentencepiece_bytes(tokenizer)  # the TypeError naming what is accepted
  if os.path.isdir(tokenizer):
    if not any(os.path.exists(os.path.join(tokenizer, name)) for name in HF_TOKENIZER_FILES):
      raise ValueError(f"tokenizer folder {tokenizer} has none of {HF_TOKENIZER_FILES}")
  elif not os.path.isfile(tokenizer):
    raise ValueError(f"tokenizer {tokenizer} does not exist; pass a SentencePiece .model file or a "
                     "folder of HuggingFace tokenizer files")


def sentencepiece_bytes(tokenizer) -> bytes:
  if isinstance(tokenizer, (bytes, bytearray)):
    return bytes(tokenizer)
  if isinstance(tokenizer, (str, os.PathLike)):
    with open(tokenizer, "rb") as f:
      return f.read()
  if hasattr(tokenizer, "sp_model"):  # seqio.SentencePieceVocabulary (with its extra ids)
    return tokenizer.sp_model
  raise TypeError(f"tokenizer={tokenizer!r}: expected a SentencePiece .model path, its bytes, "
                  "a seqio.SentencePieceVocabulary or a folder of HuggingFace tokenizer files")


def parse_model(model: bytes):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  return proto


def check_supported(proto, processor) -> None:
  """Only what the fast tokenizer below reproduces exactly."""
  if proto.trainer_spec.model_type != BPE:
    raise ValueError(f"SentencePiece model_type={proto.trainer_spec.model_type} is not exported as a "
                     "fast tokenizer (only BPE, glmjax's vocabulary type); pass a folder of "
                     "HuggingFace tokenizer files instead")
  norm = proto.normalizer_spec
  if norm.name not in ("identity", "") or norm.precompiled_charsmap:
    raise ValueError(f"SentencePiece normalization {norm.name!r} is not exported exactly (only "
                     "'identity'); pass a folder of HuggingFace tokenizer files instead")
  if norm.remove_extra_whitespaces:
    raise ValueError("SentencePiece remove_extra_whitespaces=true is not exported exactly; pass a "
                     "folder of HuggingFace tokenizer files instead")
  boundary = next((p.piece for p in proto.pieces if p.type == USER_DEFINED), None)
  prefix = norm.add_dummy_prefix
  stray = [p.piece for p in proto.pieces
           if p.type == NORMAL and not _encodes_to_itself(processor, p.piece, boundary, prefix)]
  if stray:
    raise ValueError(f"SentencePiece pieces {stray[:5]} do not encode to themselves, so a fast "
                     "tokenizer cannot reproduce this vocabulary exactly; pass a folder of "
                     "HuggingFace tokenizer files instead")


def _encodes_to_itself(processor, piece: str, boundary, prefix: bool) -> bool:
  """Whether SentencePiece gives this piece alone where it can be a whole pre-token: a text that
  is just the piece (after the dummy prefix), or the piece right after a user-defined symbol."""
  if len(piece) == 1:
    return True  # one symbol: nothing to merge
  piece_id = processor.PieceToId(piece)
  if prefix and piece.startswith(SPACE):
    return processor.EncodeAsIds(piece[1:].replace(SPACE, " ")) == [piece_id]
  if not prefix and processor.EncodeAsIds(piece.replace(SPACE, " ")) != [piece_id]:
    return False
  if boundary is None:
    return True
  head = processor.EncodeAsIds(boundary)
  ids = processor.EncodeAsIds(boundary + piece.replace(SPACE, " "))
  return ids[:len(head)] == head and ids[len(head):] == [piece_id]


def bpe_merges(pieces) -> list:
  """Every split (left, right) of a normal piece into two vocabulary pieces, the merge of the
  higher-scoring piece first: SentencePiece BPE merges the best-scoring adjacent pair."""
  index = {p.piece: i for i, p in enumerate(pieces)}
  merges = []
  for i, p in enumerate(pieces):
    if p.type != NORMAL:
      continue
    for cut in range(1, len(p.piece)):
      left, right = p.piece[:cut], p.piece[cut:]
      if left in index and right in index:
        merges.append((-p.score, i, index[left], index[right], left, right))
  return [(m[4], m[5]) for m in sorted(merges)]


def fast_tokenizer_json(proto) -> str:
  try:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing tokenizer.json needs the `tokenizers` package (installed with "
                      "transformers): pip install 'glmjax[torch]', or export with tokenizer=None") from e
  pieces = proto.pieces
  unk_id = proto.trainer_spec.unk_id
  byte_fallback = proto.trainer_spec.byte_fallback
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  model = models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=pieces[unk_id].piece,
                     fuse_unk=True, byte_fallback=byte_fallback, ignore_merges=True)
  tokenizer = Tokenizer(model)
  prefix = proto.normalizer_spec.add_dummy_prefix
  steps = [normalizers.Prepend(SPACE)] if prefix else []
  tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
  user = sorted((p.piece for p in pieces if p.type == USER_DEFINED), key=len, reverse=True)
  if user:
    pattern = "|".join(re.escape(piece.replace(" ", SPACE)) for piece in user)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
  steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  tokenizer.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in pieces if p.type == CONTROL])
  return tokenizer.to_str()


def write(tokenizer, out_dir: str, config) -> tuple[list[str], dict]:
  """Writes the tokenizer; returns (file names, {bos,eos,pad}_token_id for config.json)."""
  if isinstance(tokenizer, (str, os.PathLike)) and os.path.isdir(tokenizer):
    written = []
    for name in HF_TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer, name)):
        shutil.copyfile(os.path.join(tokenizer, name), os.path.join(out_dir, name))
        written.append(name)
    if not written:
      raise ValueError(f"tokenizer folder {tokenizer} has none of {HF_TOKENIZER_FILES}")
    return written, {}

  model = sentencepiece_bytes(tokenizer)
  proto = parse_model(model)
  import sentencepiece  # pylint: disable=import-outside-toplevel
  check_supported(proto, sentencepiece.SentencePieceProcessor(model_proto=model))
  if len(proto.pieces) > config.vocab_size:
    raise ValueError(f"the tokenizer has {len(proto.pieces)} pieces but ModelConfig.vocab_size="
                     f"{config.vocab_size}; export with the vocabulary the model was trained on")
  spec = proto.trainer_spec
  ids = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}
  ids = {k: v for k, v in ids.items() if 0 <= v < len(proto.pieces)}
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(model)
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(fast_tokenizer_json(proto))
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "add_bos_token": False,
      "add_eos_token": False,
      "model_max_length": config.max_length,
      "clean_up_tokenization_spaces": False,
      **{f"{name}_token": proto.pieces[i].piece for name, i in ids.items()},
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
  special = {f"{name}_token_id": i for name, i in ids.items() if name != "unk"}
  return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"], special
