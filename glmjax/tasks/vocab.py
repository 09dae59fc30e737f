"""SentencePiece vocabulary with GLM's special tokens as single ids.

`default_vocabulary()` is the tokenizer shipped in glmjax/tasks/data/, trained
on the embedded corpus (glmjax/tasks/corpus.py) with:

  glmjax tokenizer train \
      --input glmjax/tasks/data/corpus/shakespeare.train.jsonl.gz \
              glmjax/tasks/data/corpus/poems_zh.train.jsonl.gz@10 \
      --vocab_size 8192 --character_coverage 1.0 \
      --out glmjax/tasks/data/glm_en_zh_8k.model

(`@10` repeats the small Chinese part ten times so that Chinese gets merges
too; coverage 1.0 gives every character of the corpus its own piece.) Ids of the special tokens in that model:

  <pad> 0, </s> (eos) 1, <unk> 2, [MASK] 3, [sMASK] 4, [gMASK] 5, <sop> 6,
  <eop> 7, <|system|> 8, <|user|> 9, <|assistant|> 10, <|observation|> 11,
  "\\n" 12.

The specials are SentencePiece user-defined symbols: typing "[MASK]" in text
encodes to the single id, and decoding gives the text back. Normalization is
the identity and byte fallback is on, so decode(encode(x)) == x for any text.

`ChatGLMVocabulary` is ChatGLM2/3's own tokenizer instead (their tokenizer.model, the
specials appended after its pieces); `chatglm_tokenizer_in(folder)` finds it in a run's
tokenizer/ after `glmjax import`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import pathlib
import struct
import tempfile
from typing import Iterable, Iterator, Sequence

import seqio
import sentencepiece as spm
import tensorflow_text as tf_text
from sentencepiece import sentencepiece_model_pb2

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "glm_en_zh_8k.model"

MASK = "[MASK]"
SMASK = "[sMASK]"
GMASK = "[gMASK]"
SOP = "<sop>"
EOP = "<eop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
NEWLINE = "\n"
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "observation": OBSERVATION}
# Printable ASCII always gets a piece, so digits and operators of the arithmetic
# tasks are single ids even though the corpus barely uses them.
REQUIRED_CHARS = "".join(chr(c) for c in range(33, 127))
SPECIAL_TOKENS = (MASK, SMASK, GMASK, SOP, EOP, SYSTEM, USER, ASSISTANT, OBSERVATION, NEWLINE)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the control and GLM special tokens of one vocabulary."""
  pad: int
  eos: int
  unk: int
  mask: int
  smask: int
  gmask: int
  sop: int
  eop: int
  system: int
  user: int
  assistant: int
  observation: int
  newline: int

  def role(self, name: str) -> int:
    if name not in ROLES:
      raise ValueError(f"chat role={name!r} is not one of {sorted(ROLES)}")
    return getattr(self, name)


_FIELD_OF_TOKEN = {MASK: "mask", SMASK: "smask", GMASK: "gmask", SOP: "sop", EOP: "eop",
                   SYSTEM: "system", USER: "user", ASSISTANT: "assistant",
                   OBSERVATION: "observation", NEWLINE: "newline"}


# A SentencePiece precompiled charsmap that matches no input: <trie size, uint32><double-array
# trie><normalized strings>. The trie (darts-clone units) is a root whose children sit at
# 256 + byte and are all empty, so every lookup fails on its first byte (a NUL byte "matches"
# an empty unit, which is no rule either) and the normalizer copies each character, malformed
# bytes becoming U+FFFD, exactly as with no charsmap. The root passes darts' validate().
_MATCH_NOTHING_TRIE = struct.pack("<512I", 256 << 10, *([0] * 511))
MATCH_NOTHING_CHARSMAP = struct.pack("<I", len(_MATCH_NOTHING_TRIE)) + _MATCH_NOTHING_TRIE + b"\0"


@functools.lru_cache(maxsize=8)
def with_match_nothing_charsmap(sp_model: bytes) -> bytes:
  """The serialized model, its empty (identity) charsmap replaced by MATCH_NOTHING_CHARSMAP.

  The SentencePiece copy inside tensorflow-text logs "precompiled_charsmap is
  empty. use identity normalization." to stderr for every identity-normalized
  model (the shipped one, LLaMA's), from a tf.data thread where no filter
  reaches; a charsmap without rules normalizes the same and says nothing.
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp_model)
  if proto.normalizer_spec.precompiled_charsmap:
    return sp_model
  proto.normalizer_spec.precompiled_charsmap = MATCH_NOTHING_CHARSMAP
  return proto.SerializeToString()


def _missing_specials(processor: spm.SentencePieceProcessor) -> list[str]:
  return [t for t in SPECIAL_TOKENS if processor.piece_to_id(t) == processor.unk_id()]


class GLMVocabulary(seqio.SentencePieceVocabulary):
  """A seqio SentencePieceVocabulary whose model has every GLM special token.

  Raises ValueError at construction when a special token is missing; any
  SentencePiece model (LLaMA's, Mistral's) can get them with
  `add_special_tokens` / `glmjax tokenizer add-specials`.
  """

  def __init__(self, sentencepiece_model_file: str | os.PathLike, use_fast_tokenizer: bool = False):
    super().__init__(str(sentencepiece_model_file), extra_ids=0, use_fast_tokenizer=use_fast_tokenizer)
    missing = _missing_specials(self.tokenizer)
    if missing:
      raise ValueError(
          f"sentencepiece_model_file={sentencepiece_model_file} lacks the special tokens "
          f"{missing}; add them with `glmjax tokenizer add-specials --model "
          f"{sentencepiece_model_file} --out NEW.model` and load NEW.model")

  @property
  def tf_tokenizer(self):
    """tf_text's tokenizer (encode_tf / decode_tf), on the model with a rule-free charsmap.

    Same ids as the Python tokenizer, without tensorflow-text's log line (see
    `with_match_nothing_charsmap`); exported / saved models keep `sp_model`.
    """
    if self._use_fast_tokenizer:
      return super().tf_tokenizer
    return tf_text.SentencepieceTokenizer(model=with_match_nothing_charsmap(self.sp_model))

  @functools.cached_property
  def special_ids(self) -> SpecialIds:
    ids = {field: self.tokenizer.piece_to_id(token) for token, field in _FIELD_OF_TOKEN.items()}
    return SpecialIds(pad=self.pad_id, eos=self.eos_id, unk=self.unk_id, **ids)

  def __getstate__(self):
    state = super().__getstate__()
    state.pop("special_ids", None)
    return state


@functools.lru_cache(maxsize=None)
def default_vocabulary() -> GLMVocabulary:
  """The shipped vocabulary (8192 ids, English + Chinese, GLM specials)."""
  return GLMVocabulary(DEFAULT_MODEL)


def special_ids(vocabulary: seqio.Vocabulary | None = None) -> SpecialIds:
  """SpecialIds of `vocabulary` (default: the shipped one)."""
  vocabulary = vocabulary or default_vocabulary()
  if not isinstance(vocabulary, GLMVocabulary):
    raise TypeError(f"vocabulary={vocabulary} is not a GLMVocabulary; wrap its model file "
                    "with glmjax.tasks.vocab.GLMVocabulary(path)")
  return vocabulary.special_ids


# ------------------------------------------------------------------ training


def read_training_text(path: str) -> Iterator[str]:
  """Lines of text from a plain text file or from the `text` field of JSONL(.gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if is_jsonl:
        if not line.strip():
          continue
        record = json.loads(line)
        if "text" not in record:
          raise ValueError(f"{path}: JSONL record has no 'text' field (keys: {sorted(record)})")
        yield from (l for l in record["text"].splitlines() if l.strip())
      elif line.strip():
        yield line.rstrip("\n")


def parse_weighted_inputs(inputs: Sequence[str]) -> list[tuple[str, int]]:
  """'path@N' repeats a file N times in the training text; plain 'path' once."""
  parsed = []
  for item in inputs:
    path, _, repeat = item.rpartition("@") if "@" in item else (item, "", "1")
    if not repeat.isdigit() or int(repeat) < 1:
      raise ValueError(f"--input {item!r}: the repeat count after '@' must be a positive integer")
    if not os.path.exists(path):
      raise ValueError(f"--input {path!r} does not exist")
    parsed.append((path, int(repeat)))
  return parsed


def train_sentencepiece(inputs: Sequence[str], vocab_size: int, out_path: str | os.PathLike, *,
                        model_type: str = "bpe", character_coverage: float = 0.9995,
                        num_threads: int = 2) -> pathlib.Path:
  """Trains a SentencePiece model with GLM's specials as user-defined symbols.

  pad=0, eos=1, unk=2, no bos (GLM starts pieces with <sop>), then the
  specials in SPECIAL_TOKENS order from id 3. Identity normalization, no
  whitespace collapsing and byte fallback make encoding lossless; digits are
  split and every printable ASCII character is kept as a piece.
  """
  if vocab_size < len(SPECIAL_TOKENS) + 3 + 256 + 16:
    raise ValueError(f"vocab_size={vocab_size} is too small: it needs room for the 256 byte "
                     f"pieces and {len(SPECIAL_TOKENS) + 3} specials; use at least 512")
  weighted = parse_weighted_inputs(inputs)

  def sentences() -> Iterable[str]:
    for path, repeat in weighted:
      for _ in range(repeat):
        yield from read_training_text(path)

  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences()), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        user_defined_symbols=list(SPECIAL_TOKENS), required_chars=REQUIRED_CHARS,
        num_threads=num_threads,
        max_sentence_length=16384, shuffle_input_sentence=False, minloglevel=2)
    out_path.write_bytes(pathlib.Path(prefix + ".model").read_bytes())
  return out_path


def add_special_tokens(model_file: str | os.PathLike, out_file: str | os.PathLike) -> list[str]:
  """Appends the GLM special tokens a SentencePiece model lacks; returns those added."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(pathlib.Path(model_file).read_bytes())
  existing = {p.piece for p in proto.pieces}
  added = [t for t in SPECIAL_TOKENS if t not in existing]
  for token in added:
    proto.pieces.add(piece=token, score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  pathlib.Path(out_file).write_bytes(proto.SerializeToString())
  return added


# ------------------------------------------------------------------ ChatGLM2/3's tokenizer

# SPTokenizer.__init__ of THUDM/chatglm3-6b tokenization_chatglm.py: these follow the
# SentencePiece pieces, at ids n_words + i (ChatGLM2-6B's has the first five only).
CHATGLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                          "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHATGLM_TOKENIZER_CLASS = "ChatGLMTokenizer"
CHATGLM_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclasses.dataclass(frozen=True)
class ChatGLMSpecialIds(SpecialIds):
  """SpecialIds of a ChatGLM2/3 tokenizer: glmjax.generate.chat prompts with ChatGLM3's template.

  `newline` is the id SentencePiece gives "\\n" alone (ChatGLM3's byte piece <0x0A>); ChatGLM's
  own code never uses it as a special.
  """


class ChatGLMVocabulary(seqio.SentencePieceVocabulary):
  """ChatGLM2/3's tokenizer: the SentencePiece model, then CHATGLM_SPECIAL_TOKENS at ids
  n_words + i (THUDM/chatglm3-6b tokenization_chatglm.py, SPTokenizer).

  Encoding is the SentencePiece model's alone (SPTokenizer.encode: text never
  becomes a special id); decoding is SPTokenizer.decode: the text of each run of
  ordinary ids, and a special id as its token's name. pad is unk, as SPTokenizer.pad_id.
  """

  def __init__(self, sentencepiece_model_file: str | os.PathLike):
    super().__init__(str(sentencepiece_model_file), extra_ids=0)

  def _model_context(self):
    """seqio's loader, without its warning that pad_id is not 0: ChatGLM pads with unk."""
    if self._model:
      return self._model
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
      return super()._model_context()
    finally:
      absl_logging.set_verbosity(level)

  @property
  def n_words(self) -> int:
    """Pieces of the SentencePiece model (the first special's id)."""
    return self.tokenizer.GetPieceSize()

  @property
  def _base_vocab_size(self) -> int:
    return self.n_words + len(CHATGLM_SPECIAL_TOKENS)

  @property
  def pad_id(self) -> int:
    return self.tokenizer.unk_id()

  @functools.cached_property
  def special_tokens(self) -> dict:
    """{token: id} as SPTokenizer.special_tokens."""
    return {token: self.n_words + i for i, token in enumerate(CHATGLM_SPECIAL_TOKENS)}

  @functools.cached_property
  def special_ids(self) -> ChatGLMSpecialIds:
    t = self.special_tokens
    unk, newline = self.tokenizer.unk_id(), self.tokenizer.EncodeAsIds("\n")
    return ChatGLMSpecialIds(
        pad=self.pad_id, eos=self.tokenizer.eos_id(), unk=unk,
        mask=t["[MASK]"], smask=t["[sMASK]"], gmask=t["[gMASK]"], sop=t["sop"], eop=t["eop"],
        system=t["<|system|>"], user=t["<|user|>"], assistant=t["<|assistant|>"],
        observation=t["<|observation|>"], newline=int(newline[-1]) if newline else unk)

  def _decode(self, ids) -> str:
    """SPTokenizer.decode; ids past the vocabulary (a model's padded rows) are unk,
    as seqio decodes them."""
    index = {i: token for token, i in self.special_tokens.items()}
    unk, size = self.tokenizer.unk_id(), self._base_vocab_size
    text, buffer = "", []
    for token in (int(i) for i in ids):
      token = unk if token >= size or token < 0 else token
      if token in index:
        if buffer:
          text += self.tokenizer.DecodeIds(buffer)
          buffer = []
        text += index[token]
      else:
        buffer.append(token)
    if buffer:
      text += self.tokenizer.DecodeIds(buffer)
    return text

  def decode(self, ids) -> str:
    """As SPTokenizer.decode: every id, eos included (seqio's decode would cut after eos)."""
    return self._decode(list(ids))

  def __getstate__(self):
    state = super().__getstate__()
    for key in ("special_ids", "special_tokens"):
      state.pop(key, None)
    return state


def chatglm_tokenizer_in(folder: str | os.PathLike) -> ChatGLMVocabulary | None:
  """The ChatGLM2/3 tokenizer of a folder of HuggingFace tokenizer files (a run's tokenizer/,
  as `glmjax import` copies it), or None when the folder holds another tokenizer.

  ChatGLM2/3 ship `tokenizer.model` with a tokenizer_config.json naming
  `"tokenizer_class": "ChatGLMTokenizer"` (ChatGLM-6B's names the same class over
  `ice_text.model`, another tokenizer: None here).
  """
  folder = pathlib.Path(folder)
  config_file, model_file = folder / TOKENIZER_CONFIG, folder / CHATGLM_MODEL_FILE
  if not config_file.is_file() or not model_file.is_file():
    return None
  try:
    config = json.loads(config_file.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_file} is not valid JSON ({e}); copy tokenizer_config.json again "
                     "from the model's folder") from e
  if not isinstance(config, dict) or config.get("tokenizer_class") != CHATGLM_TOKENIZER_CLASS:
    return None
  try:
    vocabulary = ChatGLMVocabulary(model_file)
    vocabulary.tokenizer  # pylint: disable=pointless-statement
  except Exception as e:  # sentencepiece raises RuntimeError / OSError for a damaged model
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{model_file} is not a SentencePiece model ({why}); copy tokenizer.model "
                     "again from the model's folder") from e
  return vocabulary
