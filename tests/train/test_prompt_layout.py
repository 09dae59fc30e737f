"""The model's prompt_layout reaches the GLM feature converter; DataConfig flags only confirm it."""

import numpy as np
import pytest

from glmjax.model import presets
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
