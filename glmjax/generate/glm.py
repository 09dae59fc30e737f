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

`Convention` mirrors the options of glmjax.tasks.GLMFeatureConverter, so a
model is prompted the way it was trained: `bidirectional_inputs=False` makes
Part A causal; `positions_1d=True` numbers every token 0, 1, 2, ... (block
positions 0) as for LLaMA-style models.

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
from glmjax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Convention:
  """How prompts are laid out (the GLMFeatureConverter options the model was trained with)."""
  bidirectional_inputs: bool = True
  positions_1d: bool = False

  @property
  def step_rule(self):
    return PLAIN_TEXT if self.positions_1d else GLM_SPAN


GLM = Convention()


def glm_row(part_a: Sequence[int], part_b: Sequence[int], mask_index: int,
            convention: Convention = GLM) -> dict:
  """Batch-contract fields of one example: Part A, then Part B (which starts with <sop>)
  generated for the mask at Part A index `mask_index`."""
  a, b = len(part_a), len(part_b)
  if convention.positions_1d:
    positions, blocks = list(range(a + b)), [0] * (a + b)
  else:
    positions, blocks = list(range(a)) + [mask_index] * b, [0] * a + list(range(1, b + 1))
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


def _span_chunk(sop_id, positions, spans, active, width, positions_1d):
  """[B, width] chunk of `<sop> + span` per row (segment 0 after the span and on inactive rows).

  `positions[b]` is the mask index (GLM) or, with positions_1d, the position of <sop>."""
  B = len(spans)
  tokens = np.zeros((B, width), np.int32)
  seg = np.zeros((B, width), np.int32)
  for b, span in enumerate(spans):
    if active[b]:
      piece = [sop_id] + list(span)
      tokens[b, :len(piece)] = piece
      seg[b, :len(piece)] = 1
  steps = np.arange(width, dtype=np.int32)
  start = np.asarray(positions, np.int32)[:, None]
  if positions_1d:
    pos, block = start + steps[None], np.zeros((B, width), np.int32)
  else:
    pos = np.repeat(start, width, axis=1)
    block = np.broadcast_to(steps + 1, (B, width)).copy()
  return {"tokens": tokens, "positions": pos, "block_positions": block, "segment_ids": seg,
          "bidirectional": np.zeros((B, width), np.int32)}


def fill_blanks(params, config: ModelConfig, texts: Sequence[Sequence[int]], *,
                mask_ids: Sequence[int], sop_id: int, eop_id: int,
                options: GenerationOptions = GenerationOptions(), convention: Convention = GLM,
                return_logits: bool = False) -> list[BlankFill]:
  """Fills every mask of every text (token id lists), GLM style.

  `mask_ids`: the ids that open a blank ([MASK], [sMASK], [gMASK]).
  `options.max_new_tokens` bounds each span; `<eop>` (plus options.stop_ids)
  ends it. Works with every strategy of `options`, beam search included.
  """
  mask_ids = tuple(int(m) for m in mask_ids)
  where_masks = [mask_positions(t, mask_ids) for t in texts]
  for b, found in enumerate(where_masks):
    if not found:
      raise ValueError(f"text {b} has no mask token (ids {mask_ids}); add [MASK] where a blank "
                       "goes, or [gMASK] at the end for long generation")
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys((eop_id,) + options.stop_ids)))
  N = options.max_new_tokens
  num_rounds = max(len(p) for p in where_masks)
  part_a = left_pad([glm_row(t, [], 0, convention) for t in texts], options.pad_id)
  P = part_a["tokens"].shape[1]
  total = P + num_rounds * (1 + N)
  check_prompt_ids(part_a, config, total, max_block_position=N + 1)
  B = len(texts)
  cache = _feed_chunk(params, decode.init_cache(config, B, total), part_a, config=config)
  fed = [len(t) for t in texts]  # real tokens per row so far (positions_1d numbering)

  results = [BlankFill(spans=[], finished=[]) for _ in texts]
  for m in range(num_rounds):
    active = np.array([m < len(p) for p in where_masks])
    if convention.positions_1d:
      starts = fed
    else:
      starts = [p[m] if m < len(p) else 0 for p in where_masks]
    sop = _span_chunk(sop_id, starts, [[]] * B, active, 1, convention.positions_1d)
    result, new_cache = continue_chunk(params, config, cache, sop, active, options,
                                       step_rule=convention.step_rule,
                                       feed_last=options.strategy != "beam", return_logits=return_logits)
    spans = result.sequences(strip_stop=True)
    if options.strategy == "beam":
      # The beams' cache rows may not hold the winner; feed `<sop> + span` once more.
      new_cache = _feed_chunk(params, cache, _span_chunk(sop_id, starts, spans, active, 1 + N,
                                                         convention.positions_1d), config=config)
    cache = new_cache
    for b in np.flatnonzero(active):
      results[b].spans.append(spans[b])
      results[b].finished.append(bool(result.finished[b]))
      fed[b] += 1 + len(spans[b])
      if return_logits:
        results[b].logits.append(result.logits[b, :result.lengths[b]])
  return results


def continue_glm(params, config: ModelConfig, part_as: Sequence[Sequence[int]],
                 part_bs: Sequence[Sequence[int]], mask_indices: Sequence[int],
                 options: GenerationOptions = GenerationOptions(), *, convention: Convention = GLM,
                 return_logits: bool = False, on_token=None) -> GenerationResult:
  """Continues Part B of each example (Part B starts with <sop>; it may hold more, e.g. a
  chat history) for the mask at `mask_indices[b]`, until a stop id or max_new_tokens."""
  rows = [glm_row(a, b, m, convention) for a, b, m in zip(part_as, part_bs, mask_indices)]
  chunk = left_pad(rows, options.pad_id)
  total = chunk["tokens"].shape[1] + options.max_new_tokens
  longest_b = max(len(b) for b in part_bs)
  check_prompt_ids(chunk, config, total, max_block_position=longest_b + options.max_new_tokens)
  cache = decode.init_cache(config, len(rows), total)
  result, _ = continue_chunk(params, config, cache, chunk, np.ones(len(rows), bool), options,
                             step_rule=convention.step_rule, return_logits=return_logits,
                             on_token=on_token)
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
