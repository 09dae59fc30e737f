"""Data streams: seqio batches in the contract, per-process shards, exact resume by replay."""

import numpy as np
import pytest

from glmjax.model.batch import BATCH_KEYS
from glmjax.trainer import DataConfig, from_iterable
from glmjax.trainer import data as data_lib
from tests.train.helpers import progression_examples, synthetic_task

LENGTH, BATCH = 32, 4


@pytest.fixture(scope="module")
def task():
  with synthetic_task() as name:
    yield name


def config(task, **overrides):
  return DataConfig(mixture=task, sequence_length=LENGTH, batch_size=BATCH, **overrides)


def take(stream, n):
  return [next(stream) for _ in range(n)]


def test_seqio_batches_follow_the_contract(task):
  batch = next(data_lib.train_stream(config(task, shuffle=False)))
  assert set(batch) == set(BATCH_KEYS)
  for key, value in batch.items():
    assert value.shape == (BATCH, LENGTH), key
    assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key
  seg, tokens, targets = batch["segment_ids"], batch["tokens"], batch["targets"]
  assert seg.max() > 1  # packed: several examples per row
  # Causal LM: within a segment, the next input token is this position's target.
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(tokens[:, 1:][same], targets[:, :-1][same])
  np.testing.assert_array_equal(batch["loss_mask"] > 0, seg > 0)
  # The first unshuffled example is the first progression followed by EOS (id 1).
  first = progression_examples("train", 1)[0]
  np.testing.assert_array_equal(targets[0, :len(first) + 1], list(first) + [1])
  assert batch["bidirectional"].sum() == 0 and batch["block_positions"].sum() == 0


def test_each_process_reads_its_own_shards(task):
  """Two shards, one process: the global batch is shard 0's rows then shard 1's. With two
  processes each reads one shard and holds exactly its half of those rows."""
  one = take(data_lib.train_stream(config(task, num_shards=2)), 3)
  p0 = take(data_lib.train_stream(config(task, num_shards=2), process_index=0, process_count=2), 3)
  p1 = take(data_lib.train_stream(config(task, num_shards=2), process_index=1, process_count=2), 3)
  for whole, first, second in zip(one, p0, p1):
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  assert not np.array_equal(p0[0]["targets"], p1[0]["targets"])


def test_resume_replays_to_the_exact_position(task):
  straight = take(data_lib.train_stream(config(task)), 6)
  resumed = data_lib.train_stream(config(task))
  resumed.restore({"batches": 4, **resumed.layout})
  for want, got in zip(straight[4:], take(resumed, 2)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert resumed.state()["batches"] == 6


def test_restoring_a_different_layout_fails(task):
  stream = data_lib.train_stream(config(task))
  with pytest.raises(ValueError, match="num_shards=2 differs"):
    stream.restore({"batches": 1, **dict(stream.layout, num_shards=2)})


def test_any_iterable_is_resumable():
  make = lambda: ({"tokens": np.full((2, 3), i), "targets": np.full((2, 3), i),  # noqa: E731
                   "loss_mask": np.ones((2, 3))} for i in range(10))
  stream = from_iterable(make)
  take(stream, 3)
  again = from_iterable(make)
  again.restore(stream.state())
  assert int(next(again)["tokens"][0, 0]) == 3
  filled = next(again)
  np.testing.assert_array_equal(filled["segment_ids"], 1)
  np.testing.assert_array_equal(filled["positions"], [[0, 1, 2]] * 2)


def test_eval_batches_are_the_validation_split(task):
  batches = data_lib.eval_batches(config(task, eval_batches=2))
  assert len(batches) == 2
  first = progression_examples("validation", 1)[0]
  np.testing.assert_array_equal(batches[0]["targets"][0, :len(first)], first)


def test_bad_data_config_fails_clearly(task):
  with pytest.raises(ValueError, match="not a registered seqio task"):
    next(data_lib.train_stream(config("no_such_task_xyz")))
  with pytest.raises(ValueError, match="batch_size=4 must be a multiple of the 3"):
    data_lib.train_stream(config(task, num_shards=3))
  with pytest.raises(ValueError, match="DataConfig.modules"):
    data_lib.train_stream(config(task, modules=("no_such_module_xyz",)))
