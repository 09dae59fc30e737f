"""Shared test material for tuning: toy preference pairs, `glmjax train` runs of shrunk
experiments, greedy decoding by full forwards over prefixed rows."""

import jax
import numpy as np

from glmjax import config_gin
from glmjax.cli import train as train_cli
from glmjax.model import forward
from glmjax.tuning import prefix as prefix_lib
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


def cli_train(gin_file, workdir, steps, extra=(), *, shrink):
  """`glmjax train` of `gin_file` with the `shrink` bindings, then `extra`, for `steps` steps
  (the exit code); the gin registry is cleared before and after."""
  config_gin.clear()
  try:
    return train_cli.main(["--gin_file", gin_file, "--workdir", workdir]
                          + [f"--gin={b}" for b in list(shrink) + list(extra)]
                          + [f"--gin.TrainerConfig.num_steps={steps}"])
  finally:
    config_gin.clear()


def greedy_by_full_forward(params, config, prompts, new_tokens, prefix_len):
  """Greedy continuations of each prompt alone, one full forward over its prefixed row per token
  (the reference the KV-cache decoder with a P-Tuning v2 prefix must meet). Every row is
  right-padded to one length so the forward compiles once; causal attention keeps the padding
  after the last real token out of its logits."""
  length = max(len(p) for p in prompts) + new_tokens
  full_forward = jax.jit(lambda p, batch: forward(p, batch, config))
  out = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(new_tokens):
      row = np.zeros((1, length), np.int32)
      row[0, :len(seq)] = seq
      batch = prefix_lib.with_prefix_rows({"tokens": row}, prefix_len)
      logits = np.asarray(full_forward(params, batch))[0, prefix_len + len(seq) - 1]
      seq.append(int(np.argmax(logits)))
    out.append(seq[len(prompt):])
  return out
