"""Shared test material: a tiny model, a synthetic seqio task, random batches."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid

import numpy as np

from glmjax.model import presets

VOCAB = 64


def tiny_model(**overrides):
  """Divisible by every test mesh: d_model by fsdp=8, heads / kv heads / mlp / vocab by tensor=2."""
  base = dataclasses.replace(presets.get("tiny-llama"), vocab_size=VOCAB, d_model=32, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64, max_length=64)
  return dataclasses.replace(base, **overrides) if overrides else base


def progression_examples(split: str, count: int, vocab: int = VOCAB):
  """Deterministic arithmetic progressions mod (vocab - 2), shifted past pad=0 / eos=1:
  learnable, so the loss visibly falls."""
  rng = np.random.default_rng({"train": 0, "validation": 1}[split])
  out = []
  for _ in range(count):
    length = int(rng.integers(6, 30))
    start, step = int(rng.integers(0, vocab - 2)), int(rng.integers(1, 4))
    out.append((start + step * np.arange(length)) % (vocab - 2) + 2)
  return out


@contextlib.contextmanager
def synthetic_task(prefix: str = "glmjax_test_progressions", train_examples: int = 256,
                   validation_examples: int = 48):
  """Registers a causal-LM seqio task under a unique name; removes it afterwards."""
  import seqio
  import tensorflow as tf
  name = f"{prefix}_{uuid.uuid4().hex[:8]}"
  counts = {"train": train_examples, "validation": validation_examples}

  def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
    examples = progression_examples(split, counts[split])
    ragged = tf.ragged.constant([e.tolist() for e in examples], dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices(ragged).map(lambda t: {"targets": t})

  vocab = seqio.PassThroughVocabulary(size=VOCAB, eos_id=1)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"),
                                      num_input_examples=counts),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={"targets": seqio.Feature(vocabulary=vocab, add_eos=True)},
      shuffle_buffer_size=64)
  try:
    yield name
  finally:
    seqio.TaskRegistry.remove(name)


def random_batches(count: int, batch_size: int, length: int, seed: int = 0, vocab: int = VOCAB):
  """Unpacked causal-LM batches of random tokens (targets = next token), some padding."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(2, vocab, (batch_size, length + 1)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, batch_size)
    mask = (np.arange(length)[None, :] < lengths[:, None])
    out.append({"tokens": tokens[:, :-1] * mask, "targets": tokens[:, 1:] * mask,
                "loss_mask": mask.astype(np.float32), "segment_ids": mask.astype(np.int32)})
  return out


def endless_random_batches(batch_size: int, length: int, seed: int = 0):
  """Deterministic, endless stream: batch i depends only on (seed, i)."""
  i = 0
  while True:
    yield random_batches(1, batch_size, length, seed=seed * 1_000_003 + i)[0]
    i += 1


def use_test_compilation_cache() -> None:
  """Subprocess workers share tests/conftest.py's persistent compilation cache."""
  import pathlib

  import jax
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(__file__).resolve().parents[2] / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
