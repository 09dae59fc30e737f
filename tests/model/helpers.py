"""Shared builders for model tests: perturbed params and a packed GLM batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.model import init_params, presets


def perturbed_params(config, seed=0, scale=0.1):
  """init_params plus noise on every leaf, so zero biases and unit norm scales
  cannot hide a wrong use of any param."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def glm_batch(vocab_size, seed=0):
  """Two packed rows of length 16.

  Row 0: segment 1 = GLM Part A (5 tokens, bidirectional) + Part B (4 tokens,
  causal, positions = mask index 2, block positions 1..4); segment 2 = causal
  text (4 tokens); 3 padding tokens.
  Row 1: segment 1 = 10 causal tokens, segment 2 = 6 fully bidirectional tokens.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab_size, size=(2, 16)).astype(np.int32)
  seg = np.array([[1] * 9 + [2] * 4 + [0] * 3, [1] * 10 + [2] * 6], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 2, 2, 2, 2, 0, 1, 2, 3, 0, 0, 0],
                  list(range(10)) + list(range(6))], np.int32)
  bpos = np.array([[0] * 5 + [1, 2, 3, 4] + [0] * 7, [0] * 16], np.int32)
  bidi = np.array([[1] * 5 + [0] * 11, [0] * 10 + [1] * 6], np.int32)
  tokens[0, 13:] = 0
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "block_positions": bpos,
          "bidirectional": bidi}


def as_jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def as_numpy64(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def tiny(name, **overrides):
  return dataclasses.replace(presets.get(name), **overrides) if overrides else presets.get(name)
