"""Shared test material for tuning: toy preference pairs."""

import numpy as np

from tests.train.helpers import VOCAB


def pair_batch(pairs: int, seed: int = 0, length: int = 16, prompt: int = 6):
  """Rows 2i / 2i+1: a prompt (a progression start) then, chosen, the progression continued,
  rejected, random tokens; loss_mask on the response predictions."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(pairs):
    start, step = int(rng.integers(0, VOCAB - 2)), int(rng.integers(1, 4))
    seq = (start + step * np.arange(length + 1)) % (VOCAB - 2) + 2
    rejected = seq.copy()
    rejected[prompt:] = rng.integers(2, VOCAB, length + 1 - prompt)
    rows += [seq, rejected]
  full = np.stack(rows).astype(np.int32)
  mask = np.zeros((2 * pairs, length), np.float32)
  mask[:, prompt - 1:] = 1.0
  return {"tokens": full[:, :-1], "targets": full[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((2 * pairs, length), np.int32)}
