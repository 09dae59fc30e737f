"""Which class each published configuration exports to (no arrays: only the config is read)."""

import pytest

from glmjax.export import targets
from glmjax.model import presets

EXPECTED = {
    "llama-7b": "LlamaForCausalLM", "llama2-7b": "LlamaForCausalLM", "llama2-70b": "LlamaForCausalLM",
    "chatglm2-6b": "GlmForCausalLM", "palm-8b": "CohereForCausalLM", "gpt2": "GPT2LMHeadModel",
    "bloom-560m": "BloomForCausalLM", "bloom-176b": "BloomForCausalLM",
    "glm-large": "GLMJaxForCausalLM", "glm-10b": "GLMJaxForCausalLM", "glm-130b": "GLMJaxForCausalLM",
    "chatglm-6b": "GLMJaxForCausalLM",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_presets_export_to_the_expected_class(name):
  config = presets.get(name)
  assert targets.architecture(targets.select(config), config)[0] == EXPECTED[name]


def test_why_chatglm_6b_has_no_native_class():
  with pytest.raises(ValueError) as error:
    targets.select(presets.get("chatglm-6b"), "native")
  message = str(error.value)
  assert "ModelConfig.position='rope_2d'" in message
  assert "ModelConfig.norm_placement='deepnorm'" in message


def test_rope_layout_permutation_pairs_the_same_frequencies():
  """rotate_half pairs (i, i + R/2), interleaved (2i, 2i + 1): the permutation maps one pairing
  onto the other and leaves the unrotated tail alone; the inverse direction undoes it."""
  perm = targets.layout_permutation(10, 6, "rotate_half", "interleaved")
  assert perm.tolist() == [0, 3, 1, 4, 2, 5, 6, 7, 8, 9]
  back = targets.layout_permutation(10, 6, "interleaved", "rotate_half")
  assert perm[back].tolist() == list(range(10))
  assert targets.layout_permutation(10, 6, "interleaved", "interleaved") is None
