"""Task/mixture name -> batched tf.data pipeline of the batch contract, and resumable iterators.

Resuming: checkpoint the tf.data iterator itself (`DatasetIterator.save` /
`restore`, a tf.train.Checkpoint of the iterator: shuffle buffers, packer
state and positions, a few MB). Each process saves its own state, e.g.
`<checkpoint>/data/process_<i>`. The pipeline must be rebuilt with the same
arguments before restoring. When that state is missing (an old checkpoint,
or a changed pipeline) the pipeline is still deterministic from its seed,
so `dataset.skip(step)` reproduces the stream at the cost of recomputing it.

`seqio_batches` is the trainer's entry: any registered task or mixture, the
flat GLM example (glmjax's tasks, through `get_dataset`) or plain causal LM
(a task with only a `targets` feature, through seqio's DecoderFeatureConverter).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import seqio
import tensorflow as tf

from glmjax.model.config import LAYOUT_FLAGS, layout_from_flags
from glmjax.tasks import vocab as vocab_lib
from glmjax.tasks.converter import GLMFeatureConverter


def _provider(mixture_or_task: Union[str, seqio.Task, seqio.Mixture]):
  if isinstance(mixture_or_task, (seqio.Task, seqio.Mixture)):
    return mixture_or_task
  try:
    return seqio.get_mixture_or_task(mixture_or_task)
  except ValueError as e:
    glmjax_names = sorted(n for n in seqio.TaskRegistry.names() | seqio.MixtureRegistry.names()
                          if n.startswith("glmjax_"))
    raise ValueError(f"mixture_or_task_name={mixture_or_task!r} is not registered; import the module "
                     f"that registers it first (glmjax registers {glmjax_names})") from e


def _pad_batch(batch, batch_size):
  """Pads a final partial batch with empty rows (segment_ids 0, no loss)."""
  def pad(x):
    missing = batch_size - tf.shape(x)[0]
    x = tf.pad(x, [[0, missing], [0, 0]])
    return tf.ensure_shape(x, [batch_size, x.shape[1]])
  return {k: pad(v) for k, v in batch.items()}


def get_dataset(mixture_or_task_name: Union[str, seqio.Task, seqio.Mixture], *,
                sequence_length: int,
                batch_size: int,
                split: str = "train",
                shuffle: bool = True,
                seed: Optional[int] = 0,
                shard_info: Optional[seqio.ShardInfo] = None,
                pack: bool = True,
                num_epochs: Optional[int] = None,
                prompt_layout: Optional[str] = None,
                bidirectional_inputs: Optional[bool] = None,
                positions_1d: Optional[bool] = None,
                count_truncated: bool = False) -> tf.data.Dataset:
  """Batches of the DESIGN.md section 2 contract: dicts of [batch_size, sequence_length] arrays.

  seqio's Task/Mixture get_dataset (seeded shuffles and preprocessors; with
  `shard_info` this process reads its own shard) -> GLMFeatureConverter
  (packing and `prompt_layout`, see its options) -> batches. `batch_size` is per process.
  The layout is `prompt_layout`, else the one the (bidirectional_inputs, positions_1d) flags
  name (glmjax.model.config.LAYOUT_FLAGS; a missing flag as in "glm"), else "glm".
  `num_epochs=None` repeats forever (training); with a finite count the last
  partial batch is padded with empty rows, so every batch has one shape.
  Same arguments and seed give the same batches.
  """
  if sequence_length < 4:
    raise ValueError(f"sequence_length={sequence_length} is too short for any GLM example (>= 4)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  provider = _provider(mixture_or_task_name)
  if split not in provider.splits:
    raise ValueError(f"split={split!r} is not a split of {provider.name} (splits: {list(provider.splits)})")
  lengths = GLMFeatureConverter.task_feature_lengths(sequence_length)
  ds = provider.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                            num_epochs=num_epochs, trim_output_features=False, try_in_mem_cache=False)
  layout = _layout(prompt_layout, bidirectional_inputs, positions_1d)
  converter = GLMFeatureConverter(pack=pack, prompt_layout=layout, gmask_id=_gmask_id(provider),
                                  count_truncated=count_truncated)
  ds = converter(ds, lengths)
  if num_epochs is None:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
  return ds.prefetch(tf.data.AUTOTUNE)


def _layout(prompt_layout, bidirectional_inputs, positions_1d) -> str:
  if prompt_layout is not None:
    if bidirectional_inputs is not None or positions_1d is not None:
      raise ValueError("pass prompt_layout or the bidirectional_inputs / positions_1d flags, not both")
    return prompt_layout
  glm = LAYOUT_FLAGS["glm"]
  return layout_from_flags(glm[0] if bidirectional_inputs is None else bidirectional_inputs,
                           glm[1] if positions_1d is None else positions_1d)


def _gmask_id(provider) -> Optional[int]:
  """The [gMASK] id of the task's `tokens` vocabulary (None when it has no GLM specials)."""
  feature = provider.output_features.get("tokens")
  vocabulary = feature.vocabulary if feature is not None else None
  if not isinstance(vocabulary, vocab_lib.GLMVocabulary):
    return None
  return vocab_lib.special_ids(vocabulary).gmask


def _contract_from_decoder_features(ex: dict, pack: bool) -> dict:
  """seqio.DecoderFeatureConverter output -> batch contract (causal LM, no Part A)."""
  targets = ex["decoder_target_tokens"]
  if pack:
    segment_ids, positions = ex["decoder_segment_ids"], ex["decoder_positions"]
  else:
    segment_ids = tf.cast(targets != 0, tf.int32)
    positions = tf.broadcast_to(tf.range(tf.shape(targets)[-1], dtype=tf.int32), tf.shape(targets))
  zeros = tf.zeros_like(targets, tf.int32)
  return {"tokens": ex["decoder_input_tokens"], "targets": targets,
          "loss_mask": tf.cast(ex["decoder_loss_weights"], tf.float32),
          "segment_ids": segment_ids, "positions": positions, "block_positions": zeros,
          "bidirectional": zeros}


def _causal_lm_dataset(name: str, *, sequence_length: int, batch_size: int, split: str, shuffle: bool,
                       seed: int, shard_info, pack: bool, num_epochs: Optional[int]) -> tf.data.Dataset:
  """A seqio task/mixture with a `targets` feature as packed causal LM (seqio's decoder converter)."""
  lengths = {"targets": sequence_length}
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
      num_epochs=num_epochs)
  ds = seqio.DecoderFeatureConverter(pack=pack)(ds, lengths)
  ds = ds.map(lambda ex: _contract_from_decoder_features(ex, pack), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return ds.batch(batch_size, drop_remainder=True)


def _feature_keys(name: str) -> set:
  return set(seqio.get_mixture_or_task(name).output_features)


def seqio_batches(name: str, *, sequence_length: int, batch_size: int, split: str, shuffle: bool,
                  seed: int, shard_info: Optional[seqio.ShardInfo], pack: bool, num_epochs: Optional[int],
                  prompt_layout: str = "glm") -> tf.data.Dataset:
  """tf.data.Dataset of contract batches from any registered seqio task or mixture.

  Tasks whose only feature is `targets` (a user's plain text task) are causal
  LM through seqio's DecoderFeatureConverter; every other task (the flat GLM
  example: blank infilling, Flan, chat) goes through `get_dataset`.
  """
  if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
    raise ValueError(f"DataConfig.mixture={name!r} is not a registered seqio task or mixture; "
                     "register it in a module named in DataConfig.modules (glmjax train --module ...)")
  kwargs = dict(sequence_length=sequence_length, batch_size=batch_size, split=split, shuffle=shuffle,
                seed=seed, shard_info=shard_info, pack=pack, num_epochs=num_epochs)
  if _feature_keys(name) == {"targets"}:
    return _causal_lm_dataset(name, **kwargs)
  return get_dataset(name, prompt_layout=prompt_layout, **kwargs)


class DatasetIterator:
  """Iterator over numpy batch dicts whose position can be saved and restored."""

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    return {k: v.numpy() for k, v in batch.items()}

  def save(self, path: Union[str, os.PathLike]) -> str:
    """Writes the iterator state under the prefix `path` (its folder is created)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    return self._checkpoint.write(os.fspath(path))

  def restore(self, path: Union[str, os.PathLike]) -> None:
    """Continues from a state written by `save` for an identically built pipeline."""
    if not tf.io.gfile.glob(os.fspath(path) + ".index"):
      raise FileNotFoundError(f"no iterator state at {os.fspath(path)!r} (expected {os.fspath(path)}.index)")
    self._checkpoint.read(os.fspath(path)).assert_consumed()
