"""A tiny causal-LM seqio task for `glmjax train --module tests.export.tiny_task` in export tests."""

import numpy as np
import seqio
import tensorflow as tf

NAME = "glmjax_export_tiny_task"
VOCAB = 64


def _dataset(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
  rng = np.random.default_rng({"train": 0, "validation": 1}[split])
  rows = [((rng.integers(0, VOCAB - 2) + rng.integers(1, 4) * np.arange(20)) % (VOCAB - 2) + 2).tolist()
          for _ in range(64)]
  return tf.data.Dataset.from_tensor_slices(tf.constant(rows, tf.int32)).map(lambda t: {"targets": t})


if NAME not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      NAME,
      source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={"targets": seqio.Feature(seqio.PassThroughVocabulary(VOCAB, eos_id=1),
                                                add_eos=True)})
