"""Full-recompute references: every step runs `forward` on the whole sequence so far.

Each row is a right-padded buffer of fixed width (segment 0 after the text),
so one compiled forward serves every step; padding after the last real token
is invisible to it under the attention rule (DESIGN.md s.2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.model import forward
from tests.model.helpers import perturbed_params


def lively_params(config, seed):
  """Random params with large enough weights that greedy decoding does not just
  repeat one token (small-init random models do), so token checks bite."""
  return perturbed_params(config, seed=seed, scale=0.5)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, batch, config):
  return forward(params, batch, config)


def last_logits(params, config, fields: dict, width: int):
  """Logits [V] at the last token of one row given by lists of batch-contract fields."""
  n = len(fields["tokens"])
  batch = {k: np.zeros((1, width), np.int32) for k in
           ("tokens", "positions", "block_positions", "bidirectional", "segment_ids")}
  for key in ("tokens", "positions", "block_positions", "bidirectional"):
    batch[key][0, :n] = fields[key]
  batch["segment_ids"][0, :n] = 1
  logits = _forward(params, {k: jnp.asarray(v) for k, v in batch.items()}, config)
  return np.asarray(logits[0, n - 1])


def greedy_recompute(params, config, prompt, steps, width):
  """Greedy continuation of a plain-text prompt: (tokens, logits [steps, V])."""
  fields = {"tokens": list(prompt), "positions": list(range(len(prompt))),
            "block_positions": [0] * len(prompt), "bidirectional": [0] * len(prompt)}
  tokens, logits = [], []
  for _ in range(steps):
    row = last_logits(params, config, fields, width)
    token = int(np.argmax(row))
    tokens.append(token)
    logits.append(row)
    fields["tokens"].append(token)
    fields["positions"].append(fields["positions"][-1] + 1)
    fields["block_positions"].append(0)
    fields["bidirectional"].append(0)
  return tokens, np.stack(logits)


def glm_fill_recompute(params, config, text, mask_ids, sop_id, eop_id, max_span, width,
                       bidirectional=True, positions_1d=False):
  """Greedy GLM blank filling written from the spec (DESIGN.md s.5).

  Part A = text, positions 0..a-1, block 0, bidirectional. For each mask, left to
  right: append <sop> (position = mask index, block 1); each generated token is
  appended with the same position and block 2, 3, ...; <eop> ends the span and
  is not appended. Returns (spans, per-span logits). `bidirectional=False` makes
  Part A causal; `positions_1d` numbers all tokens 0, 1, 2, ... with block 0
  (the converter's options for LLaMA-style models).
  """
  a = len(text)
  fields = {"tokens": list(text), "positions": list(range(a)), "block_positions": [0] * a,
            "bidirectional": [int(bidirectional)] * a}

  def append(token, position, block):
    fields["tokens"].append(token)
    if positions_1d:
      position, block = len(fields["positions"]), 0
    fields["positions"].append(position)
    fields["block_positions"].append(block)
    fields["bidirectional"].append(0)

  spans, span_logits = [], []
  for m in [i for i, t in enumerate(text) if t in mask_ids]:
    append(sop_id, m, 1)
    span, rows = [], []
    for k in range(max_span):
      row = last_logits(params, config, fields, width)
      token = int(np.argmax(row))
      rows.append(row)
      if token == eop_id:
        break
      span.append(token)
      append(token, m, k + 2)
    spans.append(span)
    span_logits.append(np.stack(rows))
  return spans, span_logits


def glm130b_fill_recompute(params, config, text, mask_id, sop_id, eop_id, max_span, width, gmask=False):
  """Greedy GLM-130B blank filling written from GLM-130B generate.py (`fill_blanks`,
  `get_masks_and_position_ids`): while the text holds a mask, the input is text + <sop>, Part A
  (the text) bidirectional, positions 0, 1, 2, ... and, unless `gmask`, every position from
  <sop> on set to the mask's index; the generated span (without its stop token) replaces the
  mask in the text. Returns (spans, per-span logits, final text)."""
  text = list(text)
  spans, span_logits = [], []
  while mask_id in text:
    m = text.index(mask_id)
    a = len(text)
    fields = {"tokens": text + [sop_id], "positions": list(range(a + 1)), "block_positions": [0] * (a + 1),
              "bidirectional": [1] * a + [0]}
    if not gmask:
      fields["positions"][a:] = [m]
    span, rows = [], []
    for _ in range(max_span):
      row = last_logits(params, config, fields, width)
      token = int(np.argmax(row))
      rows.append(row)
      if token == eop_id:
        break
      span.append(token)
      fields["tokens"].append(token)
      fields["positions"].append(fields["positions"][-1] + (1 if gmask else 0))
      fields["block_positions"].append(0)
      fields["bidirectional"].append(0)
    spans.append(span)
    span_logits.append(np.stack(rows))
    text = text[:m] + span + text[m + 1:]
  return spans, span_logits, text
