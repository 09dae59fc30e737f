"""KV-cache decoding equals recomputing the full forward at every step (greedy, float32)."""

import jax
import numpy as np
import pytest

from glmjax.generate import GenerationOptions, generate
from glmjax.model import decode, presets
from tests.generate import reference

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 64, 3]]
STEPS = 6

# 1D RoPE + GQA (LLaMA), partial interleaved RoPE + GQA (ChatGLM2), 2D RoPE + DeepNorm
# (ChatGLM), ALiBi + embedding norm (BLOOM), learned (GPT-2), learned 2D (GLM),
# MQA + parallel block (PaLM).
PRESETS = ["tiny-llama", "tiny-chatglm2", "tiny-chatglm", "tiny-bloom", "tiny-gpt2", "tiny-glm",
           "tiny-palm"]


@pytest.mark.parametrize("name", PRESETS)
def test_cached_greedy_matches_full_recompute(name):
  config = presets.get(name)
  params = reference.lively_params(config, seed=3)
  result = generate(params, config, PROMPTS, GenerationOptions(max_new_tokens=STEPS),
                    return_logits=True)
  width = max(map(len, PROMPTS)) + STEPS
  for b, prompt in enumerate(PROMPTS):
    tokens, logits = reference.greedy_recompute(params, config, prompt, STEPS, width)
    assert result.sequences()[b] == tokens
    np.testing.assert_allclose(result.logits[b], logits, atol=2e-5, rtol=1e-5)


def test_cache_stores_kv_heads_only():
  for name, kv_heads in (("tiny-llama", 2), ("tiny-palm", 1)):
    config = presets.get(name)
    cache = decode.init_cache(config, batch_size=3, length=10)
    assert cache.k.shape == (config.num_layers, 3, 10, kv_heads, config.head_dim)
    assert cache.v.shape == cache.k.shape


def test_prefill_in_chunks_matches_one_chunk():
  """A bidirectional Part A prefilled in one chunk, then a causal tail token by token,
  gives the forward's logits on the whole row (DESIGN.md s.2 attention rule)."""
  config = presets.get("tiny-chatglm")
  params = reference.lively_params(config, seed=1)
  rng = np.random.default_rng(0)
  L, a = 10, 6
  row = {"tokens": rng.integers(1, config.vocab_size, (1, L)).astype(np.int32),
         "positions": np.array([[0, 1, 2, 3, 4, 5, 3, 3, 3, 3]], np.int32),
         "block_positions": np.array([[0] * a + [1, 2, 3, 4]], np.int32),
         "bidirectional": np.array([[1] * a + [0] * 4], np.int32),
         "segment_ids": np.ones((1, L), np.int32)}
  full = np.asarray(reference._forward(params, row, config))
  cache = decode.init_cache(config, 1, L)
  pieces = []
  logits, cache = decode.extend(params, cache, {k: v[:, :a] for k, v in row.items()}, config)
  pieces.append(np.asarray(logits))
  for i in range(a, L):
    logits, cache = decode.extend(params, cache, {k: v[:, i:i + 1] for k, v in row.items()}, config)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)


def test_prompt_checks():
  config = presets.get("tiny-llama")
  params = reference.lively_params(config, 0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(params, config, [[1, config.vocab_size]], GenerationOptions(max_new_tokens=2))
  with pytest.raises(ValueError, match="max_length"):
    generate(params, config, [[1] * 60], GenerationOptions(max_new_tokens=10))
  with pytest.raises(ValueError, match="GenerationOptions.top_p"):
    GenerationOptions(top_p=0.0)
