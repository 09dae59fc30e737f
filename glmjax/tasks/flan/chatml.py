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
them anyway); an over-long prompt loses its left end, the headers stay.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from glmjax.tasks import objectives

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# SmolLM2-Instruct's chat template inserts this system turn when the conversation has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over a HuggingFace `tokenizer.json` (the `tokenizers` library).

  Encodes without special tokens added; special-token strings in the text (<|im_end|>)
  map to their ids. The tokenizer is loaded on first use (registering reads nothing).
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


def chatml_encoder(system: Optional[str] = SMOLLM2_SYSTEM):
  """A formats.flan `encode`: (vocabulary, prompt, target, max_length) -> the flat example (module doc)."""
  head = (f"{IM_START}system\n{system}{IM_END}\n" if system else "") + f"{IM_START}user\n"
  foot = f"{IM_END}\n{IM_START}assistant\n"

  def encode(vocabulary, prompt, target, max_length):
    head_ids = tf.constant(vocabulary.encode(head), tf.int32)
    foot_ids = tf.constant(vocabulary.encode(foot), tf.int32)
    body = tf.cast(vocabulary.encode_tf(prompt), tf.int32)
    answer = tf.cast(vocabulary.encode_tf(target), tf.int32)
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
  flan.register(prefix=prefix, vocabulary=HFTokenizerVocabulary(tokenizer_dir), encode=chatml_encoder(system))
