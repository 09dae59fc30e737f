"""P-Tuning v2 on an ALiBi model (BLOOM): where the prefix sits.

ALiBi adds slope_h * (j - i) to the score of query i on key j (Press et al. 2022; BLOOM adds
slope_h * j, the same up to a per-row constant). glmjax puts the P prefix slots in front of the
row (prefix.with_prefix_rows), so prefix key p sits at distance i + P - p from the query of real
token i: the prefix acts as P tokens just before the first one, at positions -P..-1. That is what
transformers' BLOOM does with the prefix passed as `past_key_values` and an all-ones attention mask
of length P + n (its ALiBi positions are the mask's cumulative sum), so the combination is well
defined and is checked against it here; the KV-cache decoder (one prefix, prompts of equal length)
gives the full forward's greedy tokens and logits.

Left-padded batches of prompts of different lengths: the KV-cache decoder puts the prefix keys
just before each row's first real token (glmjax.model.decode._attend_with_prefix), so the padding
between the prefix and a short prompt adds no ALiBi distance (transformers skips it through the
mask's cumulative sum); checked against each prompt's own unpadded full forward.
"""

import jax
import numpy as np
import torch
import transformers

from glmjax.export import to_huggingface
from glmjax.generate import GenerationOptions, generate, left_pad
from glmjax.model import ModelConfig, decode, forward
from glmjax.tuning import prefix as prefix_lib
from glmjax.tuning.prefix import PrefixConfig
from tests.export.helpers import TOLERANCE, perturbed_params
from tests.tuning.helpers import greedy_by_full_forward

# tests/export/test_hf_parity.py's "bloom_6_heads_tied": 6 heads (slopes of 4 and of 8 heads mixed)
CONFIG = ModelConfig(vocab_size=89, d_model=48, num_layers=2, num_heads=6, num_kv_heads=6, head_dim=8,
                     ffn_dim=192, max_length=32, position="alibi", embed_norm=True, ffn="gelu_tanh",
                     qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)
P = 4


def _prefixed(seed=0):
  base = perturbed_params(CONFIG, seed=seed)
  return base, prefix_lib.apply_prefix(base, CONFIG, PrefixConfig(pre_seq_len=P, init_std=1.0),
                                       jax.random.PRNGKey(seed))


def test_alibi_prefix_equals_transformers_bloom_past_key_values(tmp_path):
  base, params = _prefixed()
  folder = str(tmp_path / "hf")
  to_huggingface(base, CONFIG, folder, target="bloom")
  tokens = np.random.default_rng(0).integers(2, CONFIG.vocab_size, (2, 11)).astype(np.int32)
  ours = np.asarray(forward(params, prefix_lib.with_prefix_rows({"tokens": tokens}, P), CONFIG))[:, P:]

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  assert type(model).__name__ == "BloomForCausalLM"
  cache = transformers.DynamicCache()
  for layer in range(CONFIG.num_layers):  # BLOOM caches [batch, heads, length, head_dim], no rotation
    k = np.asarray(params["layers"]["attn"]["prefix_k"][layer]).transpose(1, 0, 2)[None].repeat(2, 0)
    v = np.asarray(params["layers"]["attn"]["prefix_v"][layer]).transpose(1, 0, 2)[None].repeat(2, 0)
    cache.update(torch.tensor(k), torch.tensor(v), layer)
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long), cache=cache,
                   attention_mask=torch.ones(2, P + tokens.shape[1], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
  assert np.abs(ours - np.asarray(forward(base, {"tokens": tokens}, CONFIG))).max() > 1e-2  # it matters
  # and where it sits matters: one masked slot (segment 0) between the prefix and the tokens puts
  # the prefix at positions -P-1..-2, and transformers' logits are no longer met
  near = prefix_lib.with_prefix_rows({"tokens": tokens}, P)
  gap = {k: np.concatenate([v[:, :P], np.zeros_like(v[:, :1]), v[:, P:]], axis=1) for k, v in near.items()}
  moved = np.asarray(forward(params, gap, CONFIG))[:, P + 1:]
  assert np.abs(moved - theirs).max() > 1e-2


def test_greedy_decode_with_cache_equals_full_forward_on_alibi():
  _, params = _prefixed(2)
  prompts = [[5, 9, 3, 7, 2], [11, 4, 8, 6, 13]]  # equal lengths: no padding (module docstring)
  options = GenerationOptions(strategy="greedy", max_new_tokens=6, stop_ids=())
  assert generate(params, CONFIG, prompts, options).sequences() == greedy_by_full_forward(
      params, CONFIG, prompts, 6, P)
  # prefill logits: the cache's prefix slots give the full forward's logits
  tokens = np.asarray(prompts, np.int32)
  cache = decode.init_cache(CONFIG, 2, 16)
  logits, _ = decode.extend(params, cache, {"tokens": tokens, "positions": np.broadcast_to(
      np.arange(5, dtype=np.int32), (2, 5))}, CONFIG)
  full = np.asarray(forward(params, prefix_lib.with_prefix_rows({"tokens": tokens}, P), CONFIG))[:, P:]
  np.testing.assert_allclose(np.asarray(logits), full, atol=1e-5, rtol=0)


def test_left_padded_prompts_of_unequal_length_decode_as_each_alone():
  _, params = _prefixed(3)
  prompts = [[5, 9, 3, 7, 2, 12], [11, 4, 8]]  # the second row gets 3 padding slots
  chunk = left_pad([{"tokens": p, "positions": list(range(len(p)))} for p in prompts])
  logits, _ = decode.extend(params, decode.init_cache(CONFIG, 2, 16), chunk, CONFIG)
  for b, prompt in enumerate(prompts):
    alone = prefix_lib.with_prefix_rows({"tokens": np.asarray([prompt], np.int32)}, P)
    want = np.asarray(forward(params, alone, CONFIG))[0, P:]
    np.testing.assert_allclose(np.asarray(logits)[b, -len(prompt):], want, atol=1e-5, rtol=0)
  options = GenerationOptions(strategy="greedy", max_new_tokens=5, stop_ids=())
  assert generate(params, CONFIG, prompts, options).sequences() == greedy_by_full_forward(
      params, CONFIG, prompts, 5, P)
