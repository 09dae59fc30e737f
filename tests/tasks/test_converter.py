"""GLMFeatureConverter: packed rows satisfy the batch contract and keep examples whole."""

import numpy as np
import pytest
import tensorflow as tf

from glmjax.tasks import GLMFeatureConverter, objectives

LENGTH = 64


def random_examples(count, seed=0, high=50):
  """Flat GLM-shaped examples with distinct, recognisable contents."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(count):
    n = int(rng.integers(1, high))
    a = int(rng.integers(0, n + 1))
    examples.append({
        "tokens": rng.integers(13, 8192, n).astype(np.int32),
        "targets": np.concatenate([np.zeros(a), rng.integers(13, 8192, n - a)]).astype(np.int32),
        "loss_mask": np.concatenate([np.zeros(a), np.ones(n - a)]).astype(np.int32),
        "positions": np.concatenate([np.arange(a), np.full(n - a, max(a - 1, 0))]).astype(np.int32),
        "block_positions": np.concatenate([np.zeros(a), np.arange(1, n - a + 1)]).astype(np.int32),
        "bidirectional": np.concatenate([np.ones(a), np.zeros(n - a)]).astype(np.int32),
    })
  return examples


def convert(examples, length=LENGTH, **kwargs):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32) for k in objectives.FEATURES})
  converter = GLMFeatureConverter(**kwargs)
  return list(converter(ds, GLMFeatureConverter.task_feature_lengths(length)).as_numpy_iterator())


def segments(row):
  """{segment id: {feature: values}} of one packed row."""
  out = {}
  for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
    where = np.flatnonzero(row["segment_ids"] == s)
    assert (np.diff(where) == 1).all(), "a segment is not contiguous"
    out[int(s)] = {k: row[k][where] for k in objectives.FEATURES}
  return out


@pytest.mark.parametrize("open_rows", [1, 8])
def test_packed_rows_keep_every_example_whole_once(open_rows):
  examples = random_examples(300)
  rows = convert(examples, open_rows=open_rows)
  seen = []
  for row in rows:
    assert set(row) == {"tokens", "targets", "loss_mask", "segment_ids", "positions", "block_positions",
                        "bidirectional"}
    for k, v in row.items():
      assert v.shape == (LENGTH,)
      assert v.dtype == (np.float32 if k == "loss_mask" else np.int32)
    ids = row["segment_ids"]
    used = int((ids > 0).sum())
    assert (ids[:used] > 0).all() and (ids[used:] == 0).all(), "padding must be at the end"
    np.testing.assert_array_equal(np.unique(ids[:used]), np.arange(1, ids.max() + 1))
    for k in row:
      np.testing.assert_array_equal(row[k][used:], 0)
    seen.extend(segments(row).values())
  key = lambda ex: tuple(ex["tokens"].tolist()) + tuple(ex["positions"].tolist())
  assert sorted(map(key, seen)) == sorted(map(key, examples))
  by_key = {key(ex): ex for ex in examples}
  for segment in seen:
    original = by_key[key(segment)]
    for k in objectives.FEATURES:
      np.testing.assert_array_equal(segment[k], original[k])  # positions restart per segment
  if open_rows == 8:
    fill = sum(len(ex["tokens"]) for ex in examples) / (len(rows) * LENGTH)
    assert fill > 0.9


def test_unpacked_rows_hold_one_example_each():
  examples = random_examples(20)
  rows = convert(examples, pack=False)
  assert len(rows) == len(examples)
  for row, example in zip(rows, examples):
    n = len(example["tokens"])
    np.testing.assert_array_equal(row["segment_ids"], np.r_[np.ones(n), np.zeros(LENGTH - n)])
    np.testing.assert_array_equal(row["tokens"][:n], example["tokens"])


def test_long_examples_are_truncated_and_counted():
  examples = random_examples(40, seed=1, high=3 * LENGTH)
  rows = convert(examples, count_truncated=True)
  expected = sum(len(ex["tokens"]) > LENGTH for ex in examples)
  assert expected > 0
  assert sum(int(r["truncated"].sum()) for r in rows) == expected
  for row in rows:
    for s, segment in segments(row).items():
      first = np.flatnonzero(row["segment_ids"] == s)[0]
      original = next(ex for ex in examples if ex["tokens"][:len(segment["tokens"])].tolist()
                      == segment["tokens"].tolist())
      assert row["truncated"][first] == int(len(original["tokens"]) > LENGTH)


def test_llama_style_options_make_everything_causal_and_1d():
  examples = random_examples(60, seed=2)
  for row in convert(examples, prompt_layout="causal"):
    np.testing.assert_array_equal(row["bidirectional"], 0)
    np.testing.assert_array_equal(row["block_positions"], 0)
    for s, segment in segments(row).items():
      np.testing.assert_array_equal(segment["positions"], np.arange(len(segment["positions"])))


def test_unequal_feature_lengths_are_rejected():
  lengths = GLMFeatureConverter.task_feature_lengths(LENGTH)
  lengths["targets"] = LENGTH + 1
  ds = tf.data.Dataset.from_tensors({k: tf.zeros([3], tf.int32) for k in objectives.FEATURES})
  with pytest.raises(ValueError, match="same length"):
    GLMFeatureConverter()(ds, lengths)


def test_glm130b_layout_keeps_mask_spans_and_numbers_gmask_spans_consecutively():
  """GLM-130B generate.py lines 42-44: arange, then `if not gmask: position_ids[context_length - 1:]
  = mask_position`; one position stream (block positions 0), Part A still bidirectional."""
  gmask, sop, eop = 5, 6, 7
  mask_example = {"tokens": [20, 3, 21, sop, 30, 31], "targets": [0, 0, 0, 30, 31, eop],
                  "loss_mask": [0, 0, 0, 1, 1, 1], "positions": [0, 1, 2, 1, 1, 1],
                  "block_positions": [0, 0, 0, 1, 2, 3], "bidirectional": [1, 1, 1, 0, 0, 0]}
  gmask_example = {"tokens": [20, 21, gmask, sop, 30, 31], "targets": [0, 0, 0, 30, 31, 32],
                   "loss_mask": [0, 0, 0, 1, 1, 1], "positions": [0, 1, 2, 2, 2, 2],
                   "block_positions": [0, 0, 0, 1, 2, 3], "bidirectional": [1, 1, 1, 0, 0, 0]}
  examples = [{k: np.array(v, np.int32) for k, v in ex.items()} for ex in (mask_example, gmask_example)]
  rows = convert(examples, length=16, prompt_layout="glm130b", gmask_id=gmask)
  assert len(rows) == 1
  got = segments(rows[0])
  np.testing.assert_array_equal(got[1]["positions"], [0, 1, 2, 1, 1, 1])
  np.testing.assert_array_equal(got[2]["positions"], [0, 1, 2, 3, 4, 5])
  for segment in got.values():
    np.testing.assert_array_equal(segment["block_positions"], 0)
    np.testing.assert_array_equal(segment["bidirectional"], [1, 1, 1, 0, 0, 0])


def test_glm130b_layout_needs_the_gmask_id():
  with pytest.raises(ValueError, match="gmask_id"):
    GLMFeatureConverter(prompt_layout="glm130b")
  with pytest.raises(ValueError, match="prompt_layout='bert'"):
    GLMFeatureConverter(prompt_layout="bert")
