"""ChatGLM-6B, GLM-10B / GLM-Large and GLM-130B (SAT) checkpoints in their own layouts: imported,
and glmjax's logits checked against float64 NumPy forwards written from the published code
(tests/export/family_reference.py) on the original tensors."""

import jax
import numpy as np
import pytest

from glmjax.export import from_huggingface, importer
from glmjax.export.torch_io import SatReader
from tests.export import family_reference, glm_family, helpers

TOLERANCE = 2e-4  # float32 glmjax against the float64 reference
L, PREFIX = 12, 5
# A GLM-style row: Part A bidirectional, then a span whose tokens share the mask's position and
# count 1, 2, ... in the block positions.
POSITIONS = np.array([0, 1, 2, 3, 4, 3, 3, 3, 3, 3, 3, 3], np.int32)
BLOCK_POSITIONS = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7], np.int32)


def glmjax_logits(params, config, tokens, positions, block_positions):
  batch = {"tokens": tokens[None], "positions": positions[None],
           "block_positions": block_positions[None],
           "bidirectional": (np.arange(L) < PREFIX).astype(np.int32)[None]}
  return helpers.jax_logits(params, config, **batch)[0]


def check(expected, actual, what):
  diff = np.abs(actual - expected).max()
  assert diff <= TOLERANCE * max(1.0, np.abs(expected).max()), f"{what}: max |diff| = {diff}"


@pytest.mark.parametrize("two_d", [True, False])
def test_chatglm6b(two_d, tmp_path):
  config, sd = glm_family.chatglm6b(two_d=two_d)
  params, mc = from_huggingface(glm_family.save_bin(tmp_path / "c", config, sd, shards=2))
  assert mc.position == ("rope_2d" if two_d else "rope") and mc.prompt_layout == "glm"
  assert mc.norm_placement == "deepnorm" and not mc.tie_embeddings
  tokens = helpers.random_tokens(mc.vocab_size, (1, L))[0]
  positions = POSITIONS if two_d else np.arange(L, dtype=np.int32)
  expected = family_reference.chatglm6b(config, sd, tokens, positions, BLOCK_POSITIONS, PREFIX)
  check(expected, glmjax_logits(params, mc, tokens, positions, BLOCK_POSITIONS), "chatglm-6b")


@pytest.mark.parametrize("block,prefix", [(True, "glm."), (True, ""), (False, "glm.")])
def test_glm_10b_layout(block, prefix, tmp_path):
  config, sd = glm_family.glm_block(block=block, prefix=prefix)
  params, mc = from_huggingface(glm_family.save_bin(tmp_path / "g", config, sd))
  assert mc.position == ("learned_2d" if block else "learned") and mc.tie_embeddings
  tokens = helpers.random_tokens(mc.vocab_size, (1, L))[0]
  positions = POSITIONS if block else np.arange(L, dtype=np.int32)
  blocks = BLOCK_POSITIONS if block else np.zeros(L, np.int32)
  expected = family_reference.glm_block(config, sd, tokens, positions, blocks, PREFIX, g=prefix)
  check(expected, glmjax_logits(params, mc, tokens, positions, blocks), "glm-10b")


def test_glm_10b_is_told_apart_from_glm4(tmp_path):
  """model_type "glm" with GLMModel's fields goes to the GLM-10B layout, not GlmForCausalLM."""
  config, sd = glm_family.glm_block()
  config.pop("architectures")
  params, mc = from_huggingface(glm_family.save_safetensors(tmp_path / "g", config, sd))
  assert mc.position == "learned_2d" and mc.norm == "layernorm"


@pytest.mark.parametrize("tp", [8, 4])
def test_glm130b_sat_shards_merge_and_give_the_reference_logits(tp, tmp_path):
  config, sd = glm_family.glm130b()
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, tp)
  with SatReader(folder) as reader:
    assert reader.tensor_parallel == tp
    assert sorted(reader.names()) == sorted(sd)
    for name, value in sd.items():  # merged shards equal the unsharded tensors
      assert reader.shape(name) == value.shape and np.array_equal(reader.get(name), value), name
  params, mc = from_huggingface(folder)
  assert (mc.ffn, mc.norm_placement, mc.position, mc.prompt_layout) == (
      "geglu", "deepnorm", "rope", "glm130b")
  tokens = helpers.random_tokens(mc.vocab_size, (1, L))[0]
  positions = np.arange(L, dtype=np.int32)
  expected = family_reference.glm130b(config, sd, tokens, positions, PREFIX)
  check(expected, glmjax_logits(params, mc, tokens, positions, np.zeros(L, np.int32)), "glm-130b")


def test_streaming_import_gives_the_same_params(tmp_path):
  """iter_slices (one checkpoint tensor at a time) and iter_leaves (one group of leaves at a time)
  rebuild exactly what from_huggingface returns, here from 4-way GLM-130B shards."""
  config, sd = glm_family.glm130b()
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, 4)
  params, mc = from_huggingface(folder)
  flat = {tuple(k.key for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  with importer.open_checkpoint(folder) as (reader, target, stream_config):
    assert stream_config == mc
    rebuilt = {path: np.empty_like(v) for path, v in flat.items()}
    for path, layer, value in importer.iter_slices(reader, mc, target):
      rebuilt[path][() if layer is None else layer] = value
    leaves = dict(importer.iter_leaves(reader, mc, target))
  assert all(np.array_equal(rebuilt[p], flat[p]) and np.array_equal(leaves[p], flat[p]) for p in flat)
