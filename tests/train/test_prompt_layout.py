"""DataConfig's prompt layout reaches the GLM feature converter."""

import numpy as np

from glmjax.trainer.data import DataConfig, eval_batches


def _first_batch(**layout):
  config = DataConfig(mixture="glmjax_corpus_en_blank_infilling", sequence_length=64, batch_size=2,
                      eval_batches=1, **layout)
  return eval_batches(config)[0]


def test_glm_layout_has_bidirectional_part_a_and_block_positions():
  batch = _first_batch()
  assert batch["bidirectional"].any() and batch["block_positions"].any()


def test_llama_layout_is_causal_with_1d_positions():
  batch = _first_batch(bidirectional_inputs=False, positions_1d=True)
  assert not batch["bidirectional"].any() and not batch["block_positions"].any()
  row = batch["positions"][0][batch["segment_ids"][0] == 1]
  np.testing.assert_array_equal(row, np.arange(row.size))
