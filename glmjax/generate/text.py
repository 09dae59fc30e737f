"""Text in, text out: the token-id generators behind a vocabulary and a prompt mode.

Modes (how a prompt string becomes a GLM example, as the tasks build them):
  blank  the prompt holds [MASK] / [sMASK] / [gMASK] blanks; each is filled,
         the answer is the prompt with its blanks replaced
  gmask  Part A = prompt + [gMASK], generation in Part B (long generation,
         the Flan / instruction format of glmjax.tasks.formats)
  text   Part A empty, Part B = <sop> + prompt (the causal-LM task format)
  raw    plain left-to-right continuation with positions 0, 1, 2, ... and no
         special tokens (models imported from HuggingFace)
  auto   blank when the prompt holds a mask token, else gmask
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

from glmjax.generate import chat as chat_lib
from glmjax.generate import glm
from glmjax.generate.decoding import GenerationOptions, generate

MODES = ("auto", "blank", "gmask", "text", "raw")


@dataclasses.dataclass
class TextGenerator:
  params: object
  config: object  # ModelConfig
  vocabulary: object  # glmjax.tasks.vocab.GLMVocabulary
  convention: glm.Convention = glm.GLM
  sharding_context: Callable = contextlib.nullcontext
  batch_multiple: int = 1  # the mesh's batch shards: batches are padded to a multiple

  @property
  def ids(self):
    return self.vocabulary.special_ids

  def encode(self, text: str) -> list[int]:
    return list(self.vocabulary.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocabulary.decode(list(ids))

  def _mask_ids(self):
    return (self.ids.mask, self.ids.smask, self.ids.gmask)

  def pad_batch(self, rows: list) -> list:
    """Repeats the last row until the batch divides over the mesh's batch shards."""
    extra = -len(rows) % self.batch_multiple
    return rows + [rows[-1]] * extra

  def mode_of(self, prompt_ids: Sequence[int], mode: str) -> str:
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "auto":
      has_blank = any(t in (self.ids.mask, self.ids.smask) for t in prompt_ids)
      return "blank" if has_blank else "gmask"
    return mode

  def complete(self, prompts: Sequence[str], options: GenerationOptions, mode: str = "auto",
               on_text: Optional[Callable[[str], None]] = None) -> list[str]:
    """One answer per prompt. Prompts of one call share a mode (auto picks from the first).

    `on_text(piece)` streams the newly decoded text of a single prompt as tokens arrive.
    """
    encoded = [self.encode(p) for p in prompts]
    mode = self.mode_of(encoded[0], mode)
    streamer = _Streamer(self, on_text) if on_text is not None and len(prompts) == 1 else None
    on_token = streamer.on_token if streamer is not None else None
    if options.strategy == "beam":
      on_token = None
    ids = self.ids
    n = len(encoded)
    options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys(
        (ids.eop, ids.eos) + options.stop_ids)))
    with self.sharding_context():
      if mode == "blank":
        fills = glm.fill_blanks(self.params, self.config, self.pad_batch(encoded),
                                mask_ids=self._mask_ids(), sop_id=ids.sop, eop_id=ids.eop,
                                options=options, convention=self.convention)
        outputs = [self.decode(f.filled(t, self._mask_ids())) for f, t in zip(fills[:n], encoded)]
      elif mode == "raw":
        result = generate(self.params, self.config, self.pad_batch(encoded), options, on_token=on_token)
        outputs = [self.decode(s) for s in result.sequences()[:n]]
      else:
        if mode == "gmask":
          part_as = [t + [ids.gmask] for t in encoded]
          masks = [len(t) for t in encoded]
          part_bs = [[ids.sop]] * n
        else:
          part_as, masks, part_bs = [[]] * n, [0] * n, [[ids.sop] + t for t in encoded]
        result = glm.continue_glm(self.params, self.config, self.pad_batch(part_as),
                                  self.pad_batch(part_bs), self.pad_batch(masks), options,
                                  convention=self.convention, on_token=on_token)
        outputs = [self.decode(s) for s in result.sequences()[:n]]
    if streamer is not None:
      streamer.finish()
    return outputs

  def chat(self, history: Sequence[chat_lib.Turn], options: GenerationOptions,
           on_text: Optional[Callable[[str], None]] = None) -> str:
    """The assistant's reply to `history` (its last turn is usually the user's)."""
    streamer = _Streamer(self, on_text) if on_text is not None else None
    with self.sharding_context():
      part_a, part_b = chat_lib.chat_prompt(history, self.ids, self.encode)
      options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys(
          chat_lib.stop_ids(self.ids) + options.stop_ids)))
      result = glm.continue_glm(self.params, self.config, self.pad_batch([part_a]),
                                self.pad_batch([part_b]), self.pad_batch([0]), options,
                                convention=self.convention,
                                on_token=streamer.on_token if streamer and options.strategy != "beam"
                                else None)
    if streamer is not None:
      streamer.finish()
    return self.decode(result.sequences()[0])


class _Streamer:
  """Decodes row 0's tokens as they arrive and emits the new text. Calls are put back in
  step order (sharded runs may deliver them out of order); SentencePiece pieces can change
  how earlier bytes decode, so the whole prefix is decoded each time."""

  def __init__(self, generator: TextGenerator, emit: Callable[[str], None]):
    self.generator, self.emit = generator, emit
    self.pending, self.next_step = {}, 0
    self.tokens, self.shown, self.stopped = [], "", False

  def on_token(self, step, tokens, done):
    self.pending[int(step)] = (int(tokens[0]), bool(done[0]))
    while self.next_step in self.pending:
      self._take(*self.pending.pop(self.next_step))
      self.next_step += 1

  def _take(self, token, done):
    ids = self.generator.ids
    if self.stopped or done or token in (ids.eop, ids.eos, ids.user, ids.observation):
      self.stopped = True
      return
    self.tokens.append(token)
    text = self.generator.decode(self.tokens)
    if text.startswith(self.shown) and not text.endswith("\ufffd"):
      self.emit(text[len(self.shown):])
      self.shown = text

  def finish(self):
    text = self.generator.decode(self.tokens)
    if text.startswith(self.shown) and text != self.shown:
      self.emit(text[len(self.shown):])
