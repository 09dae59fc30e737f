"""Host-side id checks: out-of-range ids fail with the field to change, before the jitted gather."""

import dataclasses

import numpy as np
import pytest

from glmjax.model import presets
from glmjax.trainer.loop import check_batch_ids


def _batch(length=8, vocab=100):
  ids = np.arange(length, dtype=np.int32)[None] % vocab
  return {"tokens": ids.copy(), "targets": ids.copy(), "positions": np.arange(length, dtype=np.int32)[None],
          "block_positions": np.zeros((1, length), np.int32)}


def test_in_range_batch_passes():
  check_batch_ids(_batch(), presets.get("tiny-glm"))


def test_token_out_of_vocab_names_vocab_size():
  batch = _batch()
  batch["targets"][0, 3] = presets.get("tiny-glm").vocab_size
  with pytest.raises(ValueError, match=r"batch\['targets'\].*ModelConfig.vocab_size=128"):
    check_batch_ids(batch, presets.get("tiny-glm"))


def test_block_position_past_learned_table_names_max_length():
  config = dataclasses.replace(presets.get("tiny-glm"), max_length=8)
  batch = _batch()
  batch["block_positions"][0, -1] = 8  # a full-row Part B reaches span length + 1
  with pytest.raises(ValueError, match=r"block_positions.*ModelConfig.max_length=8"):
    check_batch_ids(batch, config)


def test_rope_models_have_no_position_table_to_overflow():
  config = dataclasses.replace(presets.get("tiny-llama"), max_length=8)
  batch = _batch()
  batch["block_positions"][0, -1] = 50
  check_batch_ids(batch, config)
