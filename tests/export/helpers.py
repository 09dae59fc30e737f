"""Shared builders for export tests: perturbed params, logits on both sides."""

import jax
import numpy as np

from glmjax.model import ModelConfig, forward, init_params

TOLERANCE = 1e-4  # max |logits_jax - logits_torch| in float32 (issue #6)


def perturbed_params(config: ModelConfig, seed: int = 0, scale: float = 0.1) -> dict:
  """init_params plus noise on every leaf (host numpy), so zero biases and unit norm scales cannot
  hide a wrong mapping of any bias or scale."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed + 1)
  noisy = [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def random_tokens(vocab_size: int, shape=(2, 13), seed: int = 0) -> np.ndarray:
  """Ids over the whole vocabulary, including the last id (catches an off-by-one vocab)."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)
  tokens[0, -1] = vocab_size - 1
  return tokens


def jax_logits(params, config: ModelConfig, tokens: np.ndarray, **fields) -> np.ndarray:
  batch = {"tokens": tokens, **fields}
  if config.position in ("learned_2d", "rope_2d") and "block_positions" not in batch:
    batch["block_positions"] = np.zeros_like(tokens)
  return np.asarray(forward(params, batch, config))


def hf_logits(out_dir: str, tokens: np.ndarray) -> np.ndarray:
  """Logits of AutoModelForCausalLM loaded from a folder (no remote code), in float32."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def leaves_equal(a: dict, b: dict) -> bool:
  """Same tree structure, dtypes and bit-identical values."""
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  return tree_a == tree_b and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(flat_a, flat_b))
