"""Text in, text out: the token-id generators behind a vocabulary and a prompt mode.

Modes (how a prompt string becomes a GLM example, as the tasks build them):
  blank  the prompt holds [MASK] / [sMASK] / [gMASK] blanks; each is filled,
         the answer is the prompt with its blanks replaced (the model family's
         [CLS] / eos around the prompt: glm.Convention.of)
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

  def check_prompt(self, prompt_ids: Sequence[int], mode: str, options: GenerationOptions) -> None:
    """ValueError (one line) for a prompt this model cannot take in `mode`, before any compile."""
    if mode == "blank" and not any(t in self._mask_ids() for t in prompt_ids):
      raise ValueError("--mode blank needs a [MASK], [sMASK] or [gMASK] in the prompt; add one or "
                       "use --mode auto")
    specials = len(self.convention.prompt(prompt_ids)) - len(prompt_ids)  # [CLS] / eos
    if mode == "blank":  # each blank: <sop> + up to max_new_tokens, after Part A
      blanks = sum(t in self._mask_ids() for t in prompt_ids)
      needed = len(prompt_ids) + specials + blanks * (1 + options.max_new_tokens)
    else:  # [gMASK] + <sop>, or <sop>, before the new tokens
      needed = len(prompt_ids) + {"gmask": 2 + specials, "text": 1}.get(mode, 0) + options.max_new_tokens
    if needed > self.config.max_length:
      raise ValueError(f"the prompt is {len(prompt_ids)} tokens and --max_new_tokens "
                       f"{options.max_new_tokens}: {needed} positions, more than this model's "
                       f"ModelConfig.max_length={self.config.max_length}; shorten the prompt or "
                       "lower --max_new_tokens")

  def complete(self, prompts: Sequence[str], options: GenerationOptions, mode: str = "auto",
               on_text: Optional[Callable[[str], None]] = None) -> list[str]:
    """One answer per prompt. Prompts of one call share a mode (auto picks from the first).

    `on_text(piece)` streams the newly decoded text of a single prompt as tokens arrive.
    """
    encoded = [self.encode(p) for p in prompts]
    mode = self.mode_of(encoded[0], mode)
    streamer = (_Streamer(self, on_text, context=encoded[0][-1:] if mode == "raw" else ())
                if on_text is not None and len(prompts) == 1 else None)
    on_token = streamer.on_token if streamer is not None else None
    if options.strategy == "beam":
      on_token = None
    ids = self.ids
    n = len(encoded)
    options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys(
        (ids.eop, ids.eos) + options.stop_ids)))
    with self.sharding_context():
      if mode == "blank":
        prompts_ids = [self.convention.prompt(t) for t in encoded]
        fills = glm.fill_blanks(self.params, self.config, self.pad_batch(prompts_ids),
                                mask_ids=self._mask_ids(), sop_id=ids.sop, eop_id=ids.eop,
                                options=options, convention=self.convention)
        outputs = [self.decode(f.filled(t, self._mask_ids())) for f, t in zip(fills[:n], encoded)]
      elif mode == "raw":
        result = generate(self.params, self.config, self.pad_batch(encoded), options, on_token=on_token)
        outputs = [self.decode(s) for s in result.sequences()[:n]]
      else:
        if mode == "gmask":
          part_as = [self.convention.prompt(t + [ids.gmask]) for t in encoded]
          masks = [len(a) - 1 - a[::-1].index(ids.gmask) for a in part_as]
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
  how earlier bytes decode, so the whole prefix is decoded each time.

  `context`: token(s) the text continues (the prompt's last one for a raw continuation).
  SentencePiece drops the leading space of the first piece it decodes ("▁word" -> "word"),
  so the new tokens are decoded after the context and the context's own text is cut off."""

  def __init__(self, generator: TextGenerator, emit: Callable[[str], None], context: Sequence[int] = ()):
    self.generator, self.emit = generator, emit
    self.pending, self.next_step = {}, 0
    self.tokens, self.shown, self.stopped = [], "", False
    self.context = list(context)
    self.context_text = generator.decode(self.context) if self.context else ""

  def _text(self) -> str:
    if not self.context:
      return self.generator.decode(self.tokens)
    text = self.generator.decode(self.context + self.tokens)
    return text[len(self.context_text):] if text.startswith(self.context_text) else text

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
    text = self._text()
    if text.startswith(self.shown) and not text.endswith("\ufffd"):
      self.emit(text[len(self.shown):])
      self.shown = text

  def finish(self):
    text = self._text()
    if text.startswith(self.shown) and text != self.shown:
      self.emit(text[len(self.shown):])
