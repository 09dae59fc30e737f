"""Plain-Python references for GLM examples, independent of the TF implementation."""

from __future__ import annotations

import numpy as np

FEATURES = ("tokens", "targets", "loss_mask", "positions", "block_positions", "bidirectional")


def split_parts(example, sop_id: int):
  """(part_a tokens, [(mask position, span tokens, span targets, span positions, span blocks)])."""
  bidirectional = np.asarray(example["bidirectional"])
  a = int(bidirectional.sum())
  assert (bidirectional[:a] == 1).all() and (bidirectional[a:] == 0).all(), "Part A must precede Part B"
  tokens = np.asarray(example["tokens"])
  starts = [i for i in range(a, len(tokens)) if tokens[i] == sop_id]
  assert not starts or starts[0] == a, "Part B must start with <sop>"
  bounds = starts + [len(tokens)]
  spans = []
  for s, e in zip(bounds[:-1], bounds[1:]):
    spans.append((int(example["positions"][s]), tokens[s:e], np.asarray(example["targets"][s:e]),
                  np.asarray(example["positions"][s:e]), np.asarray(example["block_positions"][s:e])))
  return tokens[:a], spans


def fill_blanks(part_a, spans, mask_ids, eop_id=None) -> list[int]:
  """Replaces each mask token of Part A by the span whose position points at it. With `eop_id`,
  a span whose targets do not end in <eop> (GLM's [gMASK] suffix) keeps all its targets."""
  by_position = {}
  for position, _, span_targets, _, _ in spans:
    assert position not in by_position, "two spans point at the same mask"
    ends_in_eop = eop_id is None or span_targets[-1] == eop_id
    by_position[position] = list(span_targets[:-1] if ends_in_eop else span_targets)
  out = []
  for i, token in enumerate(part_a):
    if i in by_position:
      assert token in mask_ids, f"span position {i} does not point at a mask token ({token})"
      out.extend(by_position.pop(i))
    else:
      out.append(int(token))
  assert not by_position, f"spans point outside Part A: {sorted(by_position)}"
  return out


def check_glm_example(example, document, *, sop_id, eop_id, mask_ids):
  """Asserts every property of the flat GLM example spec against `document`."""
  lengths = {k: len(example[k]) for k in FEATURES}
  assert len(set(lengths.values())) == 1, lengths
  part_a, spans = split_parts(example, sop_id)
  a = len(part_a)
  assert list(fill_blanks(part_a, spans, mask_ids)) == list(document)
  np.testing.assert_array_equal(example["positions"][:a], np.arange(a))
  np.testing.assert_array_equal(example["block_positions"][:a], 0)
  np.testing.assert_array_equal(example["targets"][:a], 0)
  np.testing.assert_array_equal(example["loss_mask"], 1 - np.asarray(example["bidirectional"]))
  for position, tokens, targets, positions, blocks in spans:
    assert tokens[0] == sop_id and targets[-1] == eop_id
    np.testing.assert_array_equal(tokens[1:], targets[:-1])  # targets = inputs shifted within the span
    np.testing.assert_array_equal(positions, position)
    np.testing.assert_array_equal(blocks, np.arange(1, len(tokens) + 1))
  return part_a, spans
