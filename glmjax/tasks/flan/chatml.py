"""The Flan tasks for a HuggingFace-tokenized chat model (SmolLM2, Qwen-style ChatML).

glmjax's own tasks tokenize with the shipped SentencePiece vocabulary and lay an
example out as Part A prompt + [gMASK], Part B <sop> answer <eop>. A model
imported from HuggingFace needs its own tokenizer and, for an instruct model,
its chat template. `register(prefix, tokenizer_dir)` registers the same tasks
and mixtures as glmjax.tasks.flan (same records, splits, templates, rates)
under another prefix, tokenized by `tokenizer_dir/tokenizer.json` and laid out
as ChatML:

  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
  {answer}<|im_end|>

Loss falls on the answer and the closing <|im_end|> only (Part B; the last
header token "\\n" opens it, in <sop>'s place). Made for the "causal" prompt
layout (ModelConfig.prompt_layout = 'causal'; LLaMA-family imports have it).
Header, prompt and footer are tokenized separately (the special tokens split
them anyway); an over-long prompt loses its left end, the headers stay. Prompts
and answers are tokenized in TF ops only (LineTable), so the trainer can
checkpoint the tf.data iterator. Each line's ids are the tokenizer's own; joining
lines with the newline token equals tokenizing the whole text for a byte-level
BPE that does not merge across newlines (SmolLM2's: all 5616 real prompts tried
agreed; tests/tasks/test_flan_real_chatml.py compares whole examples with
transformers' apply_chat_template). Whitespace runs such as "\n\n\n " at the
very end of a text may be segmented differently.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from glmjax.tasks import formats, objectives

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# SmolLM2-Instruct's chat template inserts this system turn when the conversation has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over a HuggingFace `tokenizer.json` (the `tokenizers` library).

  Encodes without special tokens added; special-token strings in the text (<|im_end|>)
  map to their ids. The tokenizer is loaded on first use (registering reads nothing).
  `encode_tf` runs the tokenizer in a tf.py_function, which tf.data cannot checkpoint:
  the tasks use LineTable instead.
  """

  def __init__(self, path: str | os.PathLike, eos_token: str = IM_END):
    self._path = os.fspath(path)
    self._eos_token = eos_token
    self._tokenizer = None
    super().__init__(extra_ids=0)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      import tokenizers  # pylint: disable=import-outside-toplevel
      file = os.path.join(self._path, "tokenizer.json") if os.path.isdir(self._path) else self._path
      if not os.path.isfile(file):
        raise ValueError(f"no HuggingFace tokenizer at {self._path!r} (a tokenizer.json, or a folder with one, "
                         "e.g. the tokenizer/ folder of a `glmjax import` run)")
      self._tokenizer = tokenizers.Tokenizer.from_file(file)
    return self._tokenizer

  def token_id(self, token: str) -> int:
    found = self.tokenizer.token_to_id(token)
    if found is None:
      raise ValueError(f"the tokenizer at {self._path!r} has no token {token!r}")
    return found

  @property
  def eos_id(self) -> Optional[int]:
    return self.token_id(self._eos_token)

  @property
  def unk_id(self) -> Optional[int]:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str):
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text):
      return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)
    ids = tf.py_function(encode, [s], tf.int32)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode(values):
      return self._decode(values.numpy().tolist())
    return tf.ensure_shape(tf.py_function(decode, [ids], tf.string), [])

  def __getstate__(self):
    return {"_path": self._path, "_eos_token": self._eos_token, "_tokenizer": None, "_extra_ids": 0}

  def __eq__(self, other):
    return isinstance(other, HFTokenizerVocabulary) and other._path == self._path  # pylint: disable=protected-access

  def __hash__(self):
    return hash(self._path)


_FINGERPRINT_BUCKETS = 2**62
_TABLES: dict = {}  # (vocabulary, dataset, templates) -> LineTable


def _byte_level_ids(vocabulary: HFTokenizerVocabulary) -> np.ndarray:
  """int32 [256]: the token of each byte (GPT-2 byte-level alphabet), -1 where the vocabulary has none."""
  chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  mapping = {b: chr(b) for b in chars}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  ids = [vocabulary.tokenizer.token_to_id(mapping[b]) for b in range(256)]
  return np.asarray([-1 if i is None else i for i in ids], np.int32)


class LineTable:
  """Text -> token ids in TF ops only (tf.data iterators that hold them can be checkpointed).

  The `tokenizers` library runs in Python, which a checkpointable tf.data pipeline cannot call
  (tf.py_function is stateful). Byte-level BPE never merges across a newline, so a text's ids are
  its lines' ids joined by the newline token; every line a task can produce (each template
  rendered with each record, formats.render_text) is tokenized once, in Python, when the task's
  dataset is built, and looked up by fingerprint (tf.strings.to_hash_bucket_fast + searchsorted).
  A line not in the table (none, for the registered tasks) falls back to one token per byte:
  the same text, not the tokenizer's segmentation.
  """

  def __init__(self, vocabulary: HFTokenizerVocabulary, lines):
    lines = sorted(set(lines))
    with tf.init_scope():
      fingerprints = tf.strings.to_hash_bucket_fast(tf.constant(lines or [""], tf.string),
                                                    _FINGERPRINT_BUCKETS).numpy()
    lines = lines or [""]
    order = np.argsort(fingerprints, kind="stable")
    fingerprints = fingerprints[order]
    if len(np.unique(fingerprints)) != len(fingerprints):
      raise ValueError("two lines share a fingerprint; cannot build the line table")
    encoded = vocabulary.tokenizer.encode_batch([lines[i] for i in order], add_special_tokens=False)
    self._fingerprints = fingerprints
    self._flat = np.asarray([t for e in encoded for t in e.ids], np.int32)
    self._lengths = np.asarray([len(e.ids) for e in encoded], np.int64)
    self._bytes = _byte_level_ids(vocabulary)
    newline = vocabulary.encode("\n")
    if len(newline) != 1:
      raise ValueError(f"the tokenizer encodes a newline as {newline}; LineTable needs one token")
    self._newline = int(newline[0])
    self.size = len(lines)

  def _tensors(self):
    # Eager tensors, captured by the dataset functions: as graph constants, the table (MBs) would
    # be copied and constant-folded by every tf.data graph rewrite (minutes per task).
    if not hasattr(self, "_eager"):
      with tf.init_scope():
        self._eager = (tf.constant(self._fingerprints, tf.int64),
                       tf.RaggedTensor.from_row_lengths(tf.constant(self._flat, tf.int32),
                                                        tf.constant(self._lengths), validate=False))
    return self._eager

  def encode_tf(self, text: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 ids (graph ops only)."""
    fingerprints, table = self._tensors()
    pieces = tf.strings.split(text, "\n")
    n = tf.size(pieces)
    wanted = tf.strings.to_hash_bucket_fast(pieces, _FINGERPRINT_BUCKETS)
    at = tf.minimum(tf.searchsorted(fingerprints, wanted), self.size - 1)
    found = tf.equal(tf.gather(fingerprints, at), wanted)
    split_bytes = tf.strings.bytes_split(pieces)
    byte_values = tf.reshape(tf.io.decode_raw(split_bytes.flat_values, tf.uint8), [-1])
    by_bytes = split_bytes.with_flat_values(tf.gather(tf.constant(self._bytes), tf.cast(byte_values, tf.int32)))
    rows = tf.gather(tf.concat([tf.gather(table, at), by_bytes], 0),
                     tf.where(found, tf.range(n), n + tf.range(n)))
    breaks = tf.RaggedTensor.from_row_lengths(tf.fill([tf.maximum(n - 1, 0)], self._newline),
                                              tf.concat([tf.ones([tf.maximum(n - 1, 0)], tf.int64),
                                                         tf.zeros([tf.minimum(n, 1)], tf.int64)], 0))
    return tf.concat([rows, breaks], 1).flat_values


def task_lines(dataset: str, fmt: str):
  """Every line the task's prompts and targets can hold, over both splits (LineTable's keys)."""
  from glmjax.tasks.flan import records, templates  # pylint: disable=import-outside-toplevel
  lines = set()
  for split in records.SPLITS:
    for record in records.load_split(dataset, split):
      for prompt, target in templates.templates(dataset, fmt):
        for template in (prompt, target):
          lines.update(formats.render_text(template, record).split("\n"))
  return lines


def chatml_encoder(dataset: str, fmt: str, system: Optional[str] = SMOLLM2_SYSTEM):
  """A formats.flan `encode` for one task: (vocabulary, prompt, target, max_length) -> the flat
  example (module doc); its LineTable is built on first use."""
  head = (f"{IM_START}system\n{system}{IM_END}\n" if system else "") + f"{IM_START}user\n"
  foot = f"{IM_END}\n{IM_START}assistant\n"
  built = {}

  # Plain Python inside the traced map function: autograph would convert every call the
  # table building makes (minutes for a task of 10k records); nothing here branches on tensors.
  @tf.autograph.experimental.do_not_convert
  def encode(vocabulary, prompt, target, max_length):
    if "table" not in built:
      from glmjax.tasks.flan import templates  # pylint: disable=import-outside-toplevel
      key = (vocabulary, dataset, templates.templates(dataset, fmt))  # zero- and few-shot share one
      if key not in _TABLES:
        _TABLES[key] = LineTable(vocabulary, task_lines(dataset, fmt))
      built["table"] = _TABLES[key]
    table = built["table"]
    head_ids = tf.constant(vocabulary.encode(head), tf.int32)
    foot_ids = tf.constant(vocabulary.encode(foot), tf.int32)
    body = table.encode_tf(prompt)
    answer = table.encode_tf(target)
    if max_length is not None:
      fixed = int(head_ids.shape[0]) + int(foot_ids.shape[0]) + 1
      answer = answer[:max(1, max_length - fixed)]
      room = tf.maximum(0, max_length - fixed - tf.size(answer))
      body = body[tf.maximum(0, tf.size(body) - room):]
    prompt_ids = tf.concat([head_ids, body, foot_ids], 0)
    part_a = prompt_ids[:-1]
    b = tf.size(answer) + 1
    return objectives.assemble_example(part_a, tf.concat([prompt_ids[-1:], answer], 0),
                                       tf.concat([answer, [vocabulary.eos_id]], 0),
                                       tf.fill([b], tf.size(part_a) - 1), tf.range(1, b + 1))

  return encode


def register(prefix: str, tokenizer_dir: str | os.PathLike, *, system: Optional[str] = SMOLLM2_SYSTEM) -> None:
  """glmjax.tasks.flan's tasks and mixtures as `<prefix>_...`, ChatML over `tokenizer_dir`."""
  from glmjax.tasks import flan  # pylint: disable=import-outside-toplevel
  flan.register(prefix=prefix, vocabulary=HFTokenizerVocabulary(tokenizer_dir),
                encoder=lambda dataset, fmt: chatml_encoder(dataset, fmt, system))
