"""The model's prompt_layout reaches the GLM feature converter (DataConfig flags only confirm it),
and each family's shipped gin files give its reference positions."""

import dataclasses

import numpy as np
import pytest

from glmjax import config_gin
from glmjax.model import presets
from glmjax.tasks import vocab
from glmjax.trainer import data as data_lib
from glmjax.trainer.data import DataConfig, eval_batches, resolve_prompt_layout
from glmjax.trainer.loop import Experiment, _validate


def _first_batch(model=None, **layout):
  config = DataConfig(mixture="glmjax_corpus_en_blank_infilling", sequence_length=64, batch_size=2,
                      eval_batches=1, **layout)
  return eval_batches(config, model=model)[0]


def test_glm_layout_has_bidirectional_part_a_and_block_positions():
  batch = _first_batch(presets.get("tiny-glm"))
  assert batch["bidirectional"].any() and batch["block_positions"].any()


def test_causal_layout_is_causal_with_1d_positions():
  batch = _first_batch(presets.get("tiny-llama"))
  assert not batch["bidirectional"].any() and not batch["block_positions"].any()
  row = batch["positions"][0][batch["segment_ids"][0] == 1]
  np.testing.assert_array_equal(row, np.arange(row.size))


def test_layout_follows_the_model_not_data_defaults():
  for name, layout in [("chatglm2-6b", "causal"), ("glm-130b", "glm130b"), ("chatglm-6b", "glm"),
                       ("glm-10b", "glm"), ("llama2-7b", "causal")]:
    assert resolve_prompt_layout(DataConfig(), presets.get(name)) == layout
  # Explicit flags that agree are accepted.
  assert resolve_prompt_layout(DataConfig(bidirectional_inputs=False, positions_1d=True),
                               presets.get("chatglm2-6b")) == "causal"


@pytest.mark.parametrize("field, value, model, implied", [
    ("positions_1d", False, "chatglm2-6b", True),
    ("bidirectional_inputs", False, "glm-10b", True),
    ("positions_1d", True, "chatglm-6b", False),
    ("bidirectional_inputs", True, "llama2-7b", False),
])
def test_conflicting_data_flag_is_one_line_naming_both_fields(field, value, model, implied):
  experiment = Experiment(model=presets.get(model), data=DataConfig(sequence_length=64, **{field: value}))
  with pytest.raises(ValueError) as info:
    _validate(experiment)
  message = str(info.value)
  assert "\n" not in message
  assert f"DataConfig.{field}={value}" in message
  assert f"ModelConfig.prompt_layout={presets.get(model).prompt_layout!r}" in message
  assert f"{field}={implied}" in message


# ---------------------------------------------------------------- per family, through the shipped gin files

IDS = vocab.special_ids()
FAMILIES = {"chatglm2.gin": "causal", "llama.gin": "causal", "glm.gin": "glm", "chatglm.gin": "glm",
            "glm130b.gin": "glm130b"}


@pytest.fixture
def gin_experiment(monkeypatch):
  monkeypatch.chdir(config_gin.repo_root())
  config_gin.clear()

  def build(*files):
    config_gin.parse(files, finalize=False)
    return config_gin.build_experiment()
  yield build
  config_gin.clear()


def _batch(experiment):
  config = dataclasses.replace(experiment.data, batch_size=2, sequence_length=256, eval_batches=1)
  return data_lib.eval_batches(config, model=experiment.model)[0]


def _segments(batch):
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      yield {k: v[r][seg == s] for k, v in batch.items()}


def _expected_gmask_layout(tokens, layout):
  """Hand-built positions / block positions / bidirectional of a prompt + [gMASK] -> <sop> answer
  example: ChatGLM2/3, GLM-4, LLaMA 0..n-1 causal (HF modeling_chatglm.py get_position_ids /
  get_masks); GLM / ChatGLM-6B Part B at the mask, block positions 1.. (blocklm_utils.py lines
  423-428); GLM-130B consecutive with a bidirectional prefix (generate.py lines 36-45)."""
  n = len(tokens)
  g = int(np.flatnonzero(tokens == IDS.gmask)[0])
  assert tokens[g + 1] == IDS.sop
  if layout == "causal":
    return np.arange(n), np.zeros(n), np.zeros(n)
  bidirectional = np.array([1] * (g + 1) + [0] * (n - g - 1))
  if layout == "glm130b":
    return np.arange(n), np.zeros(n), bidirectional
  return (np.array(list(range(g + 1)) + [g] * (n - g - 1)), np.array([0] * (g + 1) + list(range(1, n - g))),
          bidirectional)


@pytest.mark.parametrize("data_gin", ["chat.gin", "flan.gin"])
@pytest.mark.parametrize("model_gin", sorted(FAMILIES))
def test_packed_chat_and_instruction_batches_have_the_familys_positions(gin_experiment, model_gin, data_gin):
  experiment = gin_experiment(f"experiments/models/{model_gin}", f"experiments/data/{data_gin}")
  layout = FAMILIES[model_gin]
  assert experiment.model.prompt_layout == layout
  batch = _batch(experiment)
  count = 0
  for segment in _segments(batch):
    positions, blocks, bidirectional = _expected_gmask_layout(segment["tokens"], layout)
    np.testing.assert_array_equal(segment["positions"], positions)
    np.testing.assert_array_equal(segment["block_positions"], blocks)
    np.testing.assert_array_equal(segment["bidirectional"], bidirectional)
    count += 1
  assert count >= 2


def test_glm130b_blank_infilling_mixes_mask_positions_and_consecutive_gmask(gin_experiment):
  """GLM-130B recipe: [MASK] spans at their mask's index, [gMASK] spans consecutive, no block
  positions, Part A bidirectional (GLM-130B generate.py lines 42-44); derived from the same
  batch in GLM's 2D layout by that rule."""
  experiment = gin_experiment("experiments/models/glm130b.gin", "experiments/data/blank_infilling_glm130b.gin")
  data = dataclasses.replace(experiment.data, batch_size=2, sequence_length=256, eval_batches=4)
  flat = data_lib.eval_batches(data, model=dataclasses.replace(experiment.model, prompt_layout="glm"))
  glm130b = data_lib.eval_batches(data, model=experiment.model)
  kinds = set()
  for two_d, one_d in zip(flat, glm130b):
    np.testing.assert_array_equal(two_d["tokens"], one_d["tokens"])
    np.testing.assert_array_equal(two_d["bidirectional"], one_d["bidirectional"])
    np.testing.assert_array_equal(one_d["block_positions"], 0)
    for a, b in zip(_segments(two_d), _segments(one_d)):
      expected = a["positions"].copy()
      part_b = a["block_positions"] > 0
      for i in np.flatnonzero(part_b):
        mask = a["tokens"][a["positions"][i]]
        kinds.add(int(mask))
        if mask == IDS.gmask:
          expected[i] = i
      np.testing.assert_array_equal(b["positions"], expected)
  assert {IDS.mask, IDS.gmask} <= kinds


def test_unknown_prompt_layout_is_one_line_naming_the_field():
  from glmjax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError) as info:
    ModelConfig(prompt_layout="prefix_lm")
  assert str(info.value) == ("ModelConfig.prompt_layout: 'prefix_lm' is not one of "
                             "('glm', 'glm130b', 'causal')")


def test_prompt_layout_is_identity_not_runtime():
  from glmjax.model.config import RUNTIME_FIELDS, architecture_fields  # pylint: disable=import-outside-toplevel
  assert "prompt_layout" not in RUNTIME_FIELDS
  assert architecture_fields(presets.get("glm-130b"))["prompt_layout"] == "glm130b"
