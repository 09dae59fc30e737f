"""GLM blank filling on token ids: `[MASK]` / `[sMASK]` spans and `[gMASK]` long generation.

The inference form of the blank-infilling spec (DESIGN.md s.5, GLM's
`generate_samples.py`): the text with its masks is Part A (positions 0..a-1,
block position 0, bidirectional when the model was trained that way). The
masks are filled one after another, left to right. For the mask at Part A
index m the decoder feeds `<sop>` with position m and block position 1; each
generated token keeps position m and takes the next block position (2, 3,
...) until `<eop>`. A filled span stays in the cache as `<sop> + span` (its
`<eop>` is never an input, as in training), so later spans see it causally.

Rows of a batch share the cache's write index: a row whose span ends early
leaves unused slots, which no query sees; position ids are unaffected, only
ALiBi (which measures distance in slots) would notice the gap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from glmjax.generate.decoding import (GLM_SPAN, GenerationOptions, check_prompt_ids, continue_chunk,
                                      left_pad, text_prompt)
from glmjax.model import decode
from glmjax.model.config import ModelConfig


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


def _span_chunk(sop_id, positions, spans, active, width):
  """[B, width] chunk of `<sop> + span` per row (segment 0 after the span and on inactive rows)."""
  B = len(spans)
  tokens = np.zeros((B, width), np.int32)
  seg = np.zeros((B, width), np.int32)
  for b, span in enumerate(spans):
    if not active[b]:
      continue
    piece = [sop_id] + list(span)
    tokens[b, :len(piece)] = piece
    seg[b, :len(piece)] = 1
  pos = np.repeat(np.asarray(positions, np.int32)[:, None], width, axis=1)
  block = np.broadcast_to(np.arange(1, width + 1, dtype=np.int32), (B, width)).copy()
  return {"tokens": tokens, "positions": pos, "block_positions": block, "segment_ids": seg,
          "bidirectional": np.zeros((B, width), np.int32)}


def fill_blanks(params, config: ModelConfig, texts: Sequence[Sequence[int]], *,
                mask_ids: Sequence[int], sop_id: int, eop_id: int,
                options: GenerationOptions = GenerationOptions(),
                bidirectional_part_a: bool = True, return_logits: bool = False) -> list[BlankFill]:
  """Fills every mask of every text (token id lists), GLM style.

  `mask_ids`: the ids that open a blank ([MASK], [sMASK], [gMASK]).
  `options.max_new_tokens` bounds each span; `<eop>` (plus options.stop_ids)
  ends it. Works with every strategy of `options`, beam search included.
  """
  mask_ids = tuple(int(m) for m in mask_ids)
  positions = [mask_positions(t, mask_ids) for t in texts]
  for b, found in enumerate(positions):
    if not found:
      raise ValueError(f"text {b} has no mask token (ids {mask_ids}); add [MASK] where a blank "
                       "goes, or [gMASK] at the end for long generation")
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys((eop_id,) + options.stop_ids)))
  N = options.max_new_tokens
  num_rounds = max(len(p) for p in positions)
  part_a = left_pad([text_prompt(t, bidirectional_part_a) for t in texts], options.pad_id)
  P = part_a["tokens"].shape[1]
  total = P + num_rounds * (1 + N)
  check_prompt_ids(part_a, config, total, max_block_position=N + 1)
  B = len(texts)
  cache = _feed_chunk(params, decode.init_cache(config, B, total), part_a, config=config)

  results = [BlankFill(spans=[], finished=[]) for _ in texts]
  for m in range(num_rounds):
    active = np.array([m < len(p) for p in positions])
    where = [p[m] if m < len(p) else 0 for p in positions]
    sop = _span_chunk(sop_id, where, [[]] * B, active, 1)
    result, new_cache = continue_chunk(params, config, cache, sop, active, options, step_rule=GLM_SPAN,
                                       feed_last=options.strategy != "beam",
                                       return_logits=return_logits)
    spans = result.sequences(strip_stop=True)
    if options.strategy == "beam":
      # The beams' cache rows may not hold the winner; feed `<sop> + span` once more.
      new_cache = _feed_chunk(params, cache, _span_chunk(sop_id, where, spans, active, 1 + N),
                          config=config)
    cache = new_cache
    for b in np.flatnonzero(active):
      results[b].spans.append(spans[b])
      results[b].finished.append(bool(result.finished[b]))
      if return_logits:
        results[b].logits.append(result.logits[b, :result.lengths[b]])
  return results


def generate_glm(params, config: ModelConfig, texts: Sequence[Sequence[int]], *, gmask_id: int,
                 sop_id: int, eop_id: int, options: GenerationOptions = GenerationOptions(),
                 bidirectional_part_a: bool = True) -> list[list[int]]:
  """`[gMASK]` long generation: continues each text (`[gMASK]` appended when absent)."""
  texts = [list(t) if gmask_id in t else list(t) + [gmask_id] for t in texts]
  fills = fill_blanks(params, config, texts, mask_ids=(gmask_id,), sop_id=sop_id, eop_id=eop_id,
                      options=options, bidirectional_part_a=bidirectional_part_a)
  return [f.spans[-1] for f in fills]
