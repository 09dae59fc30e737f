"""Tokenizer files beside exported weights.

A SentencePiece vocabulary (glmjax's own, a seqio SentencePieceVocabulary, or a
`.model` file) is written as `tokenizer.model` with a `tokenizer_config.json`
selecting transformers' `SentencePieceBackend` in legacy mode, which encodes
exactly as `SentencePieceProcessor.EncodeAsIds` (no BOS/EOS added, no extra
prefix handling), i.e. as glmjax's tasks tokenised the training data. A folder
of HuggingFace tokenizer files is copied as is.
"""

from __future__ import annotations

import json
import os
import shutil

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


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


def _piece(processor, token_id: int):
  return processor.IdToPiece(token_id) if 0 <= token_id < processor.GetPieceSize() else None


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

  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  model = sentencepiece_bytes(tokenizer)
  processor = spm.SentencePieceProcessor(model_proto=model)
  if processor.GetPieceSize() > config.vocab_size:
    raise ValueError(f"the tokenizer has {processor.GetPieceSize()} pieces but ModelConfig.vocab_size="
                     f"{config.vocab_size}; export with the vocabulary the model was trained on")
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(model)
  ids = {"bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id(),
         "pad": processor.pad_id()}
  tokenizer_config = {
      "tokenizer_class": "SentencePieceBackend",
      "legacy": True,
      "add_bos_token": False,
      "add_eos_token": False,
      "model_max_length": config.max_length,
      "clean_up_tokenization_spaces": False,
  }
  for name, token_id in ids.items():
    piece = _piece(processor, token_id)
    if piece is not None:
      tokenizer_config[f"{name}_token"] = piece
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config, f, indent=2)
  special = {f"{name}_token_id": token_id for name, token_id in ids.items()
             if name != "unk" and _piece(processor, token_id) is not None}
  return ["tokenizer.model", "tokenizer_config.json"], special
