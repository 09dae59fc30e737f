"""Data sources: in-memory records, JSONL files, local text files (and seqio's own).

Small and medium data (up to a few hundred MB) is read into memory once, on
first use, and served by `tf.data.Dataset.from_tensor_slices` over a shuffled
index: fast, deterministic from the seed, and cheap to checkpoint (the
iterator state is a list of indices, not the documents). For TFDS use
`seqio.TfdsDataSource` directly; for large sharded files
`seqio.TextLineDataSource` / `seqio.TFExampleDataSource`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

Records = Sequence[Mapping[str, object]]


def _column(records: Records, field: str, split: str):
  values = [r.get(field) for r in records]
  if any(v is None for v in values):
    missing = next(i for i, v in enumerate(values) if v is None)
    raise ValueError(f"split {split!r}: record {missing} has no field {field!r} "
                     f"(its keys: {sorted(records[missing])})")
  first = values[0]
  if isinstance(first, str):
    return tf.constant(values, tf.string)
  if isinstance(first, bool) or isinstance(first, int):
    return tf.constant(values, tf.int64)
  if isinstance(first, float):
    return tf.constant(values, tf.float32)
  if isinstance(first, (list, tuple)):
    return tf.ragged.constant([list(v) for v in values], dtype=tf.string if (
        any(isinstance(x, str) for v in values for x in v)) else tf.int64)
  raise ValueError(f"split {split!r}: field {field!r} has unsupported type {type(first).__name__}; "
                   "use str, int, float or a list of str")


def _tables(records: Records, fields: Sequence[str], split: str) -> dict:
  if not records:
    raise ValueError(f"split {split!r} has no records")
  return {f: _column(records, f, split) for f in fields}


def _serve(tables: dict, num: int, shuffle: bool, seed) -> tf.data.Dataset:
  indices = tf.data.Dataset.range(num)
  if shuffle:
    indices = indices.shuffle(num, seed=seed, reshuffle_each_iteration=True)

  return indices.map(lambda i: {k: t[i] for k, t in tables.items()}, num_parallel_calls=tf.data.AUTOTUNE)


class ShuffledRecordsSource(seqio.FunctionDataSource):
  """A FunctionDataSource whose dataset_fn shuffles every record, not just files.

  seqio warns on every shuffled FunctionDataSource ("Using an uncached
  FunctionDataset for training is not recommended since it often results in
  insufficient shuffling on restarts"): it assumes a dataset_fn that shuffles
  a few files. These sources shuffle a full index of the records, and glmjax
  resumes them from the tf.data iterator state or by seeded replay, so the
  warning does not apply and is not logged (2-4 times a run otherwise).
  """

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached: bool = False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # unused, as in seqio.FunctionDataSource
    if shard_info and shard_info.num_shards > 1:
      raise ValueError("a records source does not support low-level sharding; seqio shards its examples")
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


def records_source(load_split: Callable[[str], Records], splits: Sequence[str],
                   fields: Sequence[str] | None = None) -> seqio.FunctionDataSource:
  """A seqio source over records that `load_split(split)` returns (called once per split).

  `fields` selects the record fields to serve (default: the first record's keys).
  """
  cache: dict[str, tuple[dict, int]] = {}

  def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    if split not in splits:
      raise ValueError(f"split={split!r} is not one of {list(splits)}")
    if split not in cache:
      records = list(load_split(split))
      chosen = list(fields) if fields else list(records[0]) if records else []
      cache[split] = (_tables(records, chosen, split), len(records))
    tables, num = cache[split]
    return _serve(tables, num, shuffle_files, seed)

  return ShuffledRecordsSource(dataset_fn=dataset_fn, splits=list(splits))


def _expand(patterns: str | Sequence[str]) -> list[str]:
  patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
  paths = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.fspath(pattern)))
    if not matched:
      raise ValueError(f"no file matches {os.fspath(pattern)!r}")
    paths.extend(matched)
  return paths


def _open_text(path: str):
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(patterns: str | Sequence[str]) -> list[dict]:
  records = []
  for path in _expand(patterns):
    with _open_text(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
  return records


def jsonl_source(split_to_patterns: Mapping[str, str | Sequence[str]],
                 fields: Sequence[str] | None = None) -> seqio.FunctionDataSource:
  """JSONL(.gz) files per split, e.g. {"train": "data/*.train.jsonl", "validation": ...}."""
  return records_source(lambda split: read_jsonl(split_to_patterns[split]), list(split_to_patterns), fields)


def read_text_documents(patterns: str | Sequence[str], unit: str = "file") -> list[dict]:
  """Documents {"text": ...} from text files: one per file, per blank-line paragraph, or per line."""
  if unit not in ("file", "paragraph", "line"):
    raise ValueError(f"unit={unit!r} is not one of 'file', 'paragraph', 'line'")
  documents = []
  for path in _expand(patterns):
    with _open_text(path) as f:
      text = f.read()
    if unit == "file":
      pieces = [text]
    elif unit == "paragraph":
      pieces = text.split("\n\n")
    else:
      pieces = text.splitlines()
    documents.extend({"text": p.strip("\n")} for p in pieces if p.strip())
  return documents


def text_files_source(split_to_patterns: Mapping[str, str | Sequence[str]],
                      unit: str = "file") -> seqio.FunctionDataSource:
  """Plain UTF-8 text files (optionally .gz) per split, served as {"text": document}."""
  return records_source(lambda split: read_text_documents(split_to_patterns[split], unit),
                        list(split_to_patterns), ["text"])
