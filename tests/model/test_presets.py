"""Published parameter counts of the full-size presets, computed without memory."""

import math

import jax
import pytest

from glmjax.model import count_params, init_params, presets

# Exact counts of the official checkpoints (sum of tensor sizes in the released
# weights / HuggingFace `num_parameters()` of the official config).
EXACT = {
    "llama-7b": 6_738_415_616,  # LLaMA-1 7B (Touvron et al. 2023a, "6.7B")
    "llama2-7b": 6_738_415_616,  # meta-llama/Llama-2-7b-hf
    "llama2-70b": 68_976_648_192,  # meta-llama/Llama-2-70b-hf
    "chatglm2-6b": 6_243_584_000,  # THUDM/chatglm2-6b
    "chatglm-6b": 6_707_929_088,  # THUDM/chatglm-6b: untied lm_head (index lists lm_head.weight)
    "bloom-176b": 176_247_271_424,  # bigscience/bloom
    "bloom-560m": 559_214_592,  # bigscience/bloom-560m
    "gpt2": 124_439_808,  # openai-community/gpt2
}
# Papers that give rounded sizes only: (published size, relative tolerance).
ROUNDED = {
    "glm-large": (335e6, 0.005),  # Du et al. 2022 (GLM), table 1: 335M
    "glm-10b": (10e9, 0.02),  # Du et al. 2022: GLM-10B
    "glm-130b": (130e9, 0.02),  # Zeng et al. 2022: GLM-130B
    "palm-8b": (8.63e9, 0.001),  # Chowdhery et al. 2022, table 1: 8.63B
}


def _eval_shape_count(name):
  config = presets.get(name)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_published_count(name):
  assert _eval_shape_count(name) == EXACT[name]


@pytest.mark.parametrize("name", sorted(ROUNDED))
def test_rounded_published_count(name):
  published, rel = ROUNDED[name]
  assert abs(_eval_shape_count(name) - published) / published <= rel


def test_count_params_agrees_with_eval_shape():
  for name in ("glm-130b", "chatglm2-6b", "palm-8b"):
    assert count_params(presets.get(name)) == _eval_shape_count(name)


def test_required_presets_exist():
  required = {"glm-large", "glm-10b", "glm-130b", "chatglm-6b", "chatglm2-6b", "llama-7b",
              "llama2-7b", "llama2-70b", "palm-8b", "bloom-560m", "bloom-176b", "gpt2"}
  assert required <= set(presets.names())
  assert any(n.startswith("tiny") for n in presets.names())


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match="llama2-7b"):
    presets.get("llama-2-7b")


def test_preset_shapes_match_published_layout():
  c = presets.get("chatglm2-6b")
  assert (c.num_kv_heads, c.rotary_dim, c.rope_layout) == (2, 64, "interleaved")
  assert presets.get("palm-8b").num_kv_heads == 1
  assert presets.get("llama2-70b").ffn_dim == 28672
  assert presets.get("llama2-7b").ffn_dim == 11008
