"""GLM-style generation on token ids: `[MASK]` / `[sMASK]` blank filling, `[gMASK]` long
generation, and continuing any Part A / Part B prompt (Flan answers, chat).

The inference form of the blank-infilling spec (DESIGN.md s.5, GLM's
`generate_samples.py`): the text with its masks is Part A (positions 0..a-1,
block position 0, bidirectional). Masks are filled one after another, left to
right. For the mask at Part A index m the decoder feeds `<sop>` with position
m and block position 1; each generated token keeps position m and takes the
next block position (2, 3, ...) until `<eop>`. A filled span stays in the
cache as `<sop> + span` (its `<eop>` is never an input, as in training), so
later spans see it causally.

`Convention` is the model family's `prompt_layout` (glmjax.model.config; the
layout glmjax.tasks.GLMFeatureConverter trains with), so a model is prompted the
way it was trained: "glm" as above; "causal" numbers every token 0, 1, 2, ...
(block positions 0) with Part A causal (ChatGLM2/3, GLM-4, LLaMA-style models);
"glm130b" keeps Part A bidirectional with one position stream, a [MASK] span's
tokens at the mask's index and a [gMASK] continuation at consecutive positions
(GLM-130B `generate.py` `get_masks_and_position_ids`).

Rows of a batch share the cache's write index: a row whose span ends early
leaves unused slots, which no query sees; position ids are unaffected, only
ALiBi (which measures distance in slots) would notice the gap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import numpy as np

from glmjax.generate.decoding import (GLM_SPAN, PLAIN_TEXT, GenerationOptions, GenerationResult,
                                      check_prompt_ids, continue_chunk, left_pad)
from glmjax.model import decode
from glmjax.model.config import LAYOUT_FLAGS, ModelConfig


@dataclasses.dataclass(frozen=True)
class Convention:
  """How prompts are laid out: the model's ModelConfig.prompt_layout ("glm" | "glm130b" |
  "causal"). `gmask_id` tells a [gMASK] continuation from a [MASK] span under "glm130b"."""
  prompt_layout: str = "glm"
  gmask_id: Optional[int] = None
  # The family's specials around a blank-filling / [gMASK] prompt (`prompt`): [CLS] first, and
  # eos after the text unless it ends with one of `eos_unless_last` (`Convention.of`).
  cls_id: Optional[int] = None
  eos_id: Optional[int] = None
  eos_unless_last: tuple = ()

  def __post_init__(self):
    if self.prompt_layout not in LAYOUT_FLAGS:
      raise ValueError(f"Convention.prompt_layout={self.prompt_layout!r} is not one of "
                       f"{tuple(LAYOUT_FLAGS)} (ModelConfig.prompt_layout)")

  @classmethod
  def of(cls, config: ModelConfig, special_ids=None, cls_id: Optional[int] = None) -> "Convention":
    """The convention of a model: its prompt_layout, and its family's prompt specials given the
    vocabulary's `special_ids` (glmjax.tasks.vocab.SpecialIds) and [CLS] id (when it has one).

    GLM-10B / GLM-Large (layout "glm", learned 2D positions) with GLM's vocabulary ([CLS]
    given): [CLS] first, eos appended unless the text ends with [gMASK] (THUDM/GLM
    generate_samples.py `read_context`, lines 196-204; its samples start with [CLS] and end
    documents with eos). Without a [CLS] (a model trained here on the shipped vocabulary,
    whose samples carry neither) the prompt stays as it is.
    GLM-130B: eos appended unless the text ends with a mask, no [CLS] (GLM-130B generate.py
    `fill_blanks`, lines 72-76). ChatGLM-6B (its final tokenizer appends [gMASK] <sop> only)
    and the causal families: none.
    """
    if special_ids is None:
      return cls(config.prompt_layout)
    ids = special_ids
    if config.prompt_layout == "glm" and config.position == "learned_2d" and cls_id is not None:
      return cls("glm", ids.gmask, cls_id=cls_id, eos_id=ids.eos, eos_unless_last=(ids.gmask,))
    if config.prompt_layout == "glm130b":
      return cls("glm130b", ids.gmask, eos_id=ids.eos, eos_unless_last=(ids.mask, ids.smask, ids.gmask))
    return cls(config.prompt_layout, ids.gmask)

  def prompt(self, text: Sequence[int]) -> list[int]:
    """`text` (token ids, masks included) with the family's specials: [CLS] first, eos last."""
    out = ([self.cls_id] if self.cls_id is not None else []) + [int(t) for t in text]
    if self.eos_id is not None and (not out or out[-1] not in self.eos_unless_last):
      out.append(self.eos_id)
    return out

  @property
  def bidirectional_inputs(self) -> bool:
    return LAYOUT_FLAGS[self.prompt_layout][0]

  @property
  def positions_1d(self) -> bool:
    """One position stream (block positions 0): "glm130b" and "causal"."""
    return LAYOUT_FLAGS[self.prompt_layout][1]

  def continues(self, part_a: Sequence[int], mask_index: int) -> bool:
    """Whether Part B for the mask at `mask_index` takes consecutive positions after Part A
    (causal; GLM-130B's [gMASK] or an empty Part A) rather than the mask's position."""
    if self.prompt_layout == "causal":
      return True
    if self.prompt_layout == "glm":
      return False
    if not part_a:
      return True
    if self.gmask_id is None:
      raise ValueError("Convention(prompt_layout='glm130b') needs gmask_id to tell [gMASK] "
                       "continuations from [MASK] spans")
    return int(part_a[mask_index]) == self.gmask_id

  def step_rule(self, continues: bool):
    """(position step, block-position step) of each generated token."""
    if continues:
      return PLAIN_TEXT
    return GLM_SPAN if self.prompt_layout == "glm" else SAME_POSITION


GLM = Convention()
SAME_POSITION = (0, 0)  # GLM-130B [MASK] span: every token at the mask's position


def glm_row(part_a: Sequence[int], part_b: Sequence[int], mask_index: int,
            convention: Convention = GLM) -> dict:
  """Batch-contract fields of one example: Part A, then Part B (which starts with <sop>)
  generated for the mask at Part A index `mask_index`."""
  a, b = len(part_a), len(part_b)
  if not part_b or convention.continues(part_a, mask_index):
    positions, blocks = list(range(a + b)), [0] * (a + b)
  elif convention.prompt_layout == "glm":
    positions, blocks = list(range(a)) + [mask_index] * b, [0] * a + list(range(1, b + 1))
  else:  # glm130b [MASK] span
    positions, blocks = list(range(a)) + [mask_index] * b, [0] * (a + b)
  return {"tokens": list(part_a) + list(part_b), "positions": positions, "block_positions": blocks,
          "bidirectional": [int(convention.bidirectional_inputs)] * a + [0] * b}


@dataclasses.dataclass
class BlankFill:
  """One text's result: a span per mask (left to right, `<eop>` stripped) and
  whether each span ended with a stop token (False: cut at max_new_tokens)."""
  spans: list
  finished: list
  logits: list = dataclasses.field(default_factory=list)  # per span [len + stop, V], when asked

  def filled(self, text: Sequence[int], mask_ids: Sequence[int]) -> list[int]:
    """The text with each mask replaced by its span."""
    out, spans = [], iter(self.spans)
    for token in text:
      out.extend(next(spans) if token in mask_ids else [token])
    return out


def mask_positions(text: Sequence[int], mask_ids: Sequence[int]) -> list[int]:
  return [i for i, token in enumerate(text) if token in mask_ids]


@functools.partial(jax.jit, static_argnames=("config",))
def _feed_chunk(params, cache, chunk, *, config):
  return decode.extend(params, cache, chunk, config, last_only=True)[1]


def _span_chunk(sop_id, positions, spans, active, width, step_rule):
  """[B, width] chunk of `<sop> + span` per row (segment 0 after the span and on inactive rows).

  `positions[b]` is the position of <sop> (the mask index, or the next position when the
  span continues the text); `step_rule` (position step, block step) numbers the rest, block
  positions from 1 when they step (GLM 2D)."""
  B = len(spans)
  tokens = np.zeros((B, width), np.int32)
  seg = np.zeros((B, width), np.int32)
  for b, span in enumerate(spans):
    if active[b]:
      piece = [sop_id] + list(span)
      tokens[b, :len(piece)] = piece
      seg[b, :len(piece)] = 1
  steps = np.arange(width, dtype=np.int32)[None]
  start = np.asarray(positions, np.int32)[:, None]
  dpos, dblock = step_rule
  pos = (start + dpos * steps).astype(np.int32)
  block = np.broadcast_to(dblock * (steps + 1), (B, width)).astype(np.int32)
  return {"tokens": tokens, "positions": pos, "block_positions": block, "segment_ids": seg,
          "bidirectional": np.zeros((B, width), np.int32)}


def fill_blanks(params, config: ModelConfig, texts: Sequence[Sequence[int]], *,
                mask_ids: Sequence[int], sop_id: int, eop_id: int,
                options: GenerationOptions = GenerationOptions(), convention: Convention = GLM,
                return_logits: bool = False) -> list[BlankFill]:
  """Fills every mask of every text (token id lists), left to right, as the family does.

  `mask_ids`: the ids that open a blank ([MASK], [sMASK], [gMASK]).
  `options.max_new_tokens` bounds each span; `<eop>` (plus options.stop_ids)
  ends it. Works with every strategy of `options`, beam search included.
  "glm" / "causal": Part A stays as given and each filled `<sop> + span` stays in
  the cache for the next mask (GLM `generate_samples.py`). "glm130b": each filled
  span is written into the text in place of its mask before the next mask is
  filled (`_fill_in_place`).
  """
  mask_ids = tuple(int(m) for m in mask_ids)
  where_masks = [mask_positions(t, mask_ids) for t in texts]
  for b, found in enumerate(where_masks):
    if not found:
      raise ValueError(f"text {b} has no mask token (ids {mask_ids}); add [MASK] where a blank "
                       "goes, or [gMASK] at the end for long generation")
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys((eop_id,) + options.stop_ids)))
  if convention.prompt_layout == "glm130b":
    return _fill_in_place(params, config, texts, mask_ids, sop_id, options, convention, return_logits)
  N = options.max_new_tokens
  num_rounds = max(len(p) for p in where_masks)
  part_a = left_pad([glm_row(t, [], 0, convention) for t in texts], options.pad_id)
  P = part_a["tokens"].shape[1]
  total = P + num_rounds * (1 + N)
  check_prompt_ids(part_a, config, total, max_block_position=N + 1)
  B = len(texts)
  cache = _feed_chunk(params, decode.init_cache(config, B, total), part_a, config=config)
  fed = [len(t) for t in texts]  # real tokens per row so far (causal numbering)
  causal = convention.prompt_layout == "causal"
  rule = convention.step_rule(causal)

  results = [BlankFill(spans=[], finished=[]) for _ in texts]
  for m in range(num_rounds):
    active = np.array([m < len(p) for p in where_masks])
    starts = fed if causal else [p[m] if m < len(p) else 0 for p in where_masks]
    sop = _span_chunk(sop_id, starts, [[]] * B, active, 1, rule)
    result, new_cache = continue_chunk(params, config, cache, sop, active, options, step_rule=rule,
                                       feed_last=options.strategy != "beam", return_logits=return_logits)
    spans = result.sequences(strip_stop=True)
    if options.strategy == "beam":
      # The beams' cache rows may not hold the winner; feed `<sop> + span` once more.
      new_cache = _feed_chunk(params, cache, _span_chunk(sop_id, starts, spans, active, 1 + N, rule),
                              config=config)
    cache = new_cache
    for b in np.flatnonzero(active):
      results[b].spans.append(spans[b])
      results[b].finished.append(bool(result.finished[b]))
      fed[b] += 1 + len(spans[b])
      if return_logits:
        results[b].logits.append(result.logits[b, :result.lengths[b]])
  return results


def _fill_in_place(params, config, texts, mask_ids, sop_id, options, convention, return_logits):
  """GLM-130B blank filling: the first mask left is filled from `text + <sop>` (Part A the
  whole text, fills so far included), then its span replaces the mask in the text.

  GLM-130B `generate.py` `fill_blanks`: `mask_position = seq.index(mask_token)` on the
  current sequence, `input_seq = seq + [sop]`, and after generation
  `output[:mask_position] + output[bog + 1:unfinished] + output[mask_position + 1:bog]`
  becomes the next sequence (generate.py lines 94-148). Rows whose mask continues
  ([gMASK]) and rows whose mask is a span ([MASK]) step positions differently, so they are
  decoded in separate calls; each call keeps the batch size (other rows repeat one of its
  rows, their output unused).
  """
  for b, text in enumerate(texts):
    kinds = {int(t) for t in text if t in mask_ids}
    if len(kinds) > 1:
      raise ValueError(f"text {b} mixes mask kinds {sorted(kinds)}; GLM-130B fills one kind per text "
                       "(generate.py lines 53-58), so give each text [MASK]s, [sMASK]s or [gMASK]s only")
  current = [list(t) for t in texts]
  results = [BlankFill(spans=[], finished=[]) for _ in texts]
  B = len(texts)
  while True:
    first = [next((i for i, t in enumerate(text) if t in mask_ids), None) for text in current]
    todo = [b for b in range(B) if first[b] is not None]
    if not todo:
      return results
    for continues in (False, True):
      group = [b for b in todo if convention.continues(current[b], first[b]) == continues]
      if not group:
        continue
      rows = [b if b in group else group[0] for b in range(B)]
      result = continue_glm(params, config, [current[r] for r in rows], [[sop_id]] * B,
                            [first[r] for r in rows], options, convention=convention,
                            return_logits=return_logits)
      spans = result.sequences(strip_stop=True)
      for b in group:
        results[b].spans.append(spans[b])
        results[b].finished.append(bool(result.finished[b]))
        if return_logits:
          results[b].logits.append(result.logits[b, :result.lengths[b]])
        m = first[b]
        current[b] = current[b][:m] + list(spans[b]) + current[b][m + 1:]


def continue_glm(params, config: ModelConfig, part_as: Sequence[Sequence[int]],
                 part_bs: Sequence[Sequence[int]], mask_indices: Sequence[int],
                 options: GenerationOptions = GenerationOptions(), *, convention: Convention = GLM,
                 return_logits: bool = False, on_token=None) -> GenerationResult:
  """Continues Part B of each example (Part B starts with <sop>; it may hold more, e.g. a
  chat history) for the mask at `mask_indices[b]`, until a stop id or max_new_tokens."""
  continues = {convention.continues(a, m) for a, m in zip(part_as, mask_indices)}
  if len(continues) > 1:
    raise ValueError("the rows mix [gMASK] continuations and [MASK] spans, which GLM-130B numbers "
                     "differently; continue them in separate calls")
  rows = [glm_row(a, b, m, convention) for a, b, m in zip(part_as, part_bs, mask_indices)]
  chunk = left_pad(rows, options.pad_id)
  total = chunk["tokens"].shape[1] + options.max_new_tokens
  longest_b = max(len(b) for b in part_bs)
  check_prompt_ids(chunk, config, total, max_block_position=longest_b + options.max_new_tokens)
  cache = decode.init_cache(config, len(rows), total)
  result, _ = continue_chunk(params, config, cache, chunk, np.ones(len(rows), bool), options,
                             step_rule=convention.step_rule(continues.pop()),
                             return_logits=return_logits, on_token=on_token)
  return result


def generate_glm(params, config: ModelConfig, texts: Sequence[Sequence[int]], *, gmask_id: int,
                 sop_id: int, eop_id: int, options: GenerationOptions = GenerationOptions(),
                 convention: Convention = GLM, on_token=None) -> GenerationResult:
  """`[gMASK]` long generation: Part A = text (+ `[gMASK]` appended when absent), Part B
  starts at `<sop>`; stops at `<eop>` (plus options.stop_ids)."""
  part_as, masks = [], []
  for text in texts:
    text = list(text) if gmask_id in text else list(text) + [gmask_id]
    part_as.append(text)
    masks.append(len(text) - 1 - text[::-1].index(gmask_id))
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys((eop_id,) + options.stop_ids)))
  return continue_glm(params, config, part_as, [[sop_id]] * len(texts), masks, options,
                      convention=convention, on_token=on_token)


def scoring_row(part_a: Sequence[int], answer: Sequence[int], mask_index: int, sop_id: int,
                convention: Convention = GLM, eop_id: Optional[int] = None) -> dict:
  """Fields + targets scoring `answer` in the blank at `mask_index`: inputs <sop> answer[:-1]
  (answer + <eop> with `eop_id`), targets answer (+ <eop>), loss mask on Part B only."""
  targets = list(answer) + ([eop_id] if eop_id is not None else [])
  row = glm_row(part_a, [sop_id] + targets[:-1], mask_index, convention)
  row["targets"] = [0] * len(part_a) + targets
  row["loss_mask"] = [0] * len(part_a) + [1] * len(targets)
  return row
