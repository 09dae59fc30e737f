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


def progression_batches(count: int, batch_size: int = 16, length: int = 32):
  """Causal-LM batches of tests.train.helpers' arithmetic progressions (learnable in ~80 steps)."""
  from tests.train.helpers import progression_examples  # pylint: disable=import-outside-toplevel
  examples = progression_examples("train", count * batch_size)
  out = []
  for i in range(count):
    tokens = np.zeros((batch_size, length + 1), np.int32)
    mask = np.zeros((batch_size, length), np.float32)
    for r, example in enumerate(examples[i * batch_size:(i + 1) * batch_size]):
      example = example[:length + 1]
      tokens[r, :len(example)] = example
      mask[r, :len(example) - 1] = 1.0
    out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
                "segment_ids": (mask > 0).astype(np.int32)})
  return out
