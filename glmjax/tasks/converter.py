"""GLMFeatureConverter: flat GLM examples -> packed rows of the batch contract.

Task features (every glmjax task emits them; see glmjax.tasks.objectives):
tokens, targets, loss_mask, positions, block_positions, bidirectional, int32
vectors of one length per example.

Model features (DESIGN.md section 2), each [length]; batching adds [batch]:
tokens, targets, segment_ids, positions, block_positions, bidirectional
(int32) and loss_mask (float32); optionally `truncated` (int32, 1 on the
first token of every example that was cut to fit the row; its sum is the
number of truncated examples).

Packing is best-fit over a few open rows (`pack_rows`): examples stay whole
and rows are padded with zeros. Examples longer than the row are
truncated (counted in `truncated`). Segment ids are 1..n per row, 0 padding.
"""

from __future__ import annotations

from typing import Mapping, Optional

import seqio
import tensorflow as tf

from glmjax.model.config import PROMPT_LAYOUTS
from glmjax.tasks.objectives import FEATURES

_FeatureSpec = seqio.FeatureConverter.FeatureSpec
MODEL_FEATURES = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "block_positions",
                  "bidirectional")
_PACKED = FEATURES + ("truncated", "segment_ids")  # row order of the packed matrices


class GLMFeatureConverter(seqio.FeatureConverter):
  """Packs (or pads) flat GLM examples into fixed-length rows.

  Args:
    pack: pack several examples per row (else one example per row).
    prompt_layout: the model family's layout (glmjax.model.config.PROMPT_LAYOUTS).
      "glm" keeps the task's example as it is (Part A bidirectional, 2D positions).
      "glm130b" keeps Part A bidirectional with one position stream (block positions
      0): a [MASK] / [sMASK] span stays at its mask's index, a [gMASK] span (and a
      span with no Part A) takes its index in the example, i.e. consecutive positions
      (GLM-130B `generate.py` `get_masks_and_position_ids`, lines 42-44:
      `position_ids = arange(len)`; `if not gmask: position_ids[context_length - 1:] =
      mask_position`). "causal" makes every token causal at 0..len-1 (ChatGLM2/3 and
      GLM-4 `modeling_chatglm.py` `get_position_ids` / `get_masks`; LLaMA, GPT).
    gmask_id: the [gMASK] id (needed by "glm130b").
    count_truncated: add the `truncated` feature.
    open_rows: rows filled at once by the best-fit packer (1: next-fit).
  """

  TASK_FEATURES = {k: _FeatureSpec(dtype=tf.int32) for k in FEATURES}
  MODEL_FEATURES = {**{k: _FeatureSpec(dtype=tf.int32) for k in MODEL_FEATURES},
                    "loss_mask": _FeatureSpec(dtype=tf.float32)}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = True, *, prompt_layout: str = "glm", gmask_id: Optional[int] = None,
               count_truncated: bool = False, open_rows: int = 8):
    self.MODEL_FEATURES = dict(type(self).MODEL_FEATURES)  # pylint: disable=invalid-name
    if count_truncated:
      self.MODEL_FEATURES["truncated"] = _FeatureSpec(dtype=tf.int32)
    if prompt_layout not in PROMPT_LAYOUTS:
      raise ValueError(f"prompt_layout={prompt_layout!r} is not one of {PROMPT_LAYOUTS}")
    if prompt_layout == "glm130b" and gmask_id is None:
      raise ValueError("prompt_layout='glm130b' needs gmask_id (the [gMASK] id) to tell [gMASK] spans "
                       "(consecutive positions) from [MASK] spans")
    self._prompt_layout = prompt_layout
    self._gmask_id = gmask_id
    self._count_truncated = count_truncated
    if open_rows < 1:
      raise ValueError(f"open_rows={open_rows} must be >= 1")
    self._open_rows = open_rows
    # Lengths are enforced here (truncate + count), not by seqio's assertion.
    super().__init__(pack=pack, apply_length_check=False)

  @staticmethod
  def task_feature_lengths(length: int) -> dict[str, int]:
    """The task_feature_lengths for rows of `length` tokens."""
    return {k: int(length) for k in FEATURES}

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    return {k: self._row_length(task_feature_lengths) for k in self.MODEL_FEATURES}

  @staticmethod
  def _row_length(task_feature_lengths: Mapping[str, int]) -> int:
    lengths = {task_feature_lengths[k] for k in FEATURES}
    if len(lengths) != 1:
      raise ValueError(f"task_feature_lengths={dict(task_feature_lengths)} must give every feature the "
                       "same length (the row length); use GLMFeatureConverter.task_feature_lengths(L)")
    return lengths.pop()

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length = self._row_length(task_feature_lengths)
    ds = ds.map(lambda ex: self._to_matrix(ex, length), num_parallel_calls=tf.data.AUTOTUNE)
    rows = pack_rows(ds, length, self._open_rows) if self.pack else ds.map(
        lambda m: _pad_row(_with_segment(m, 1), length), num_parallel_calls=tf.data.AUTOTUNE)
    return rows.map(self._to_features, num_parallel_calls=tf.data.AUTOTUNE)

  def _to_matrix(self, ex, length):
    """[7, n] int32: the six task features and the truncation flag, cut to `length`."""
    n = tf.size(ex["tokens"])
    features = {k: tf.cast(ex[k], tf.int32)[:length] for k in FEATURES}
    kept = tf.minimum(n, length)
    if self._prompt_layout == "causal":
      features["bidirectional"] = tf.zeros([kept], tf.int32)
      features["positions"] = tf.range(kept)
      features["block_positions"] = tf.zeros([kept], tf.int32)
    elif self._prompt_layout == "glm130b":
      features["positions"] = glm130b_positions(features, self._gmask_id)
      features["block_positions"] = tf.zeros([kept], tf.int32)
    truncated = tf.tensor_scatter_nd_update(tf.zeros([kept], tf.int32), [[0]], [tf.cast(n > length, tf.int32)])
    return tf.stack([features[k] for k in FEATURES] + [truncated])

  def _to_features(self, row):
    out = dict(zip(_PACKED, tf.unstack(row)))
    out["loss_mask"] = tf.cast(out["loss_mask"], tf.float32)
    if not self._count_truncated:
      del out["truncated"]
    return out


def glm130b_positions(features, gmask_id):
  """GLM-130B's one position stream for a (cut) GLM example with 2D positions.

  Part B tokens (block position > 0) whose mask token is [gMASK], or that have no
  Part A, take their index in the example; everything else keeps its position
  (Part A its index, a [MASK] span its mask's index): GLM-130B `generate.py`
  `get_masks_and_position_ids` (lines 42-44) and `evaluation/dataset.py`
  `build_generation_sample` / `build_multiple_choice_sample` (lines 138-142, 259-274: a
  [gMASK] answer's <sop> at Part A's length).
  """
  positions = features["positions"]
  part_b = features["block_positions"] > 0
  no_part_a = tf.logical_not(tf.reduce_any(tf.logical_not(part_b)))
  mask_token = tf.gather(features["tokens"], tf.minimum(positions, tf.size(positions) - 1))
  continuation = part_b & (tf.equal(mask_token, gmask_id) | no_part_a)
  return tf.where(continuation, tf.range(tf.size(positions)), positions)


def _with_segment(matrix, segment_id):
  return tf.concat([matrix, tf.fill([1, tf.shape(matrix)[1]], segment_id)], 0)


def _pad_row(row, length, channels=len(_PACKED)):
  row = tf.pad(row, [[0, 0], [0, length - tf.shape(row)[1]]])
  return tf.ensure_shape(row, [channels, length])


def pack_rows(examples: tf.data.Dataset, length: int, open_rows: int = 8) -> tf.data.Dataset:
  """Best-fit packing of [F, n] int32 matrices (n <= length) into [F + 1, length] rows.

  Up to `open_rows` rows are filled at once: an example goes into the fullest
  open row it fits in; when it fits in none, the fullest row is emitted and
  the example starts a new one. The appended row is the segment id (1..k per
  packed row, 0 on padding). A sentinel at the end of a finite stream flushes
  the open rows. `open_rows=1` is plain next-fit packing.
  """
  num_features = examples.element_spec.shape[0]
  channels = num_features + 1
  sentinel = tf.data.Dataset.from_tensors((tf.zeros([num_features, 0], tf.int32), True))
  stream = examples.map(lambda m: (m, False)).concatenate(sentinel)
  none = tf.zeros([0, channels, length], tf.int32)

  def placed(matrix, segment_id, offset):
    """The example as a full-length row starting at column `offset`."""
    row = _pad_row(_with_segment(matrix, segment_id), length, channels)
    return tf.roll(row, shift=offset, axis=1)

  def add(state, matrix):
    rows, used, segments = state
    n = tf.shape(matrix)[1]
    fits = used + n <= length
    best = tf.argmax(tf.where(fits, used, -1), output_type=tf.int32)
    fullest = tf.argmax(used, output_type=tf.int32)

    def insert():
      row = rows[best] + placed(matrix, segments[best] + 1, used[best])
      new = (tf.tensor_scatter_nd_update(rows, [[best]], [row]),
             tf.tensor_scatter_nd_add(used, [[best]], [n]),
             tf.tensor_scatter_nd_add(segments, [[best]], [1]))
      return new, none

    def evict():
      new = (tf.tensor_scatter_nd_update(rows, [[fullest]], [placed(matrix, 1, 0)]),
             tf.tensor_scatter_nd_update(used, [[fullest]], [n]),
             tf.tensor_scatter_nd_update(segments, [[fullest]], [1]))
      return new, rows[fullest][None]

    return tf.cond(tf.reduce_any(fits), insert, evict)

  def flush(state):
    rows, used, _ = state
    return initial, tf.boolean_mask(rows, used > 0)

  def step(state, element):
    matrix, is_sentinel = element
    return tf.cond(is_sentinel, lambda: flush(state), lambda: add(state, matrix))

  initial = (tf.zeros([open_rows, channels, length], tf.int32), tf.zeros([open_rows], tf.int32),
             tf.zeros([open_rows], tf.int32))
  return stream.scan(initial, step).unbatch()
