"""Streaming safetensors: write one tensor at a time, read lazily with memory maps.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header size N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
"__metadata__"), then the raw little-endian tensor bytes (this module assumes a
little-endian host, as every jax platform is). Every offset is known from the
shapes alone, so a file is written header first and then
tensor by tensor: only the tensor being written is ever in host memory, which
is what lets a model larger than one host's memory be exported from sharded
device arrays. Large models are split into shards named as transformers
expects (`model-00001-of-00004.safetensors`) with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

DTYPE_NAMES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class PendingTensor:
  """A tensor to write: its name, shape and dtype now, its values when `produce()` is called."""
  name: str
  shape: tuple
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def parse_size(size) -> int:
  """'5GB' / '500MB' / '2GiB' / int bytes -> bytes (decimal units, as transformers reads them)."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f"max_shard_size={size!r} is not a size like '5GB', '500MB' or 1000000")
  unit = (match.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(match.group(1)) * scale)


def plan_shards(tensors: Sequence[PendingTensor], max_shard_bytes: int) -> list[list[PendingTensor]]:
  """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
  shards, current, size = [], [], 0
  for t in tensors:
    if current and size + t.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(t)
    size += t.nbytes
  if current:
    shards.append(current)
  return shards


def _header(tensors: Sequence[PendingTensor], metadata: dict) -> bytes:
  entries, offset = {"__metadata__": metadata}, 0
  for t in tensors:
    entries[t.name] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                       "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  header = json.dumps(entries, separators=(",", ":")).encode()
  return header + b" " * (-len(header) % 8)


def write_file(filename: str, tensors: Sequence[PendingTensor], metadata: dict) -> None:
  """Writes one safetensors file, producing each tensor only when its bytes are due."""
  header = _header(tensors, metadata)
  tmp = filename + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    for t in tensors:
      array = np.asarray(t.produce())
      if array.shape != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
        raise AssertionError(f"{t.name}: produced {array.dtype}{list(array.shape)}, "
                             f"declared {np.dtype(t.dtype)}{list(t.shape)}")
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  os.replace(tmp, filename)


def write_sharded(out_dir: str, tensors: Sequence[PendingTensor], max_shard_size="5GB",
                  metadata: dict | None = None) -> list[str]:
  """Writes `model.safetensors`, or shards + index when the total exceeds `max_shard_size`.
  Returns the file names written."""
  names = [t.name for t in tensors]
  if len(set(names)) != len(names):
    raise AssertionError(f"duplicate tensor names: {sorted(n for n in set(names) if names.count(n) > 1)}")
  metadata = {"format": "pt", **(metadata or {})}
  shards = plan_shards(tensors, parse_size(max_shard_size))
  if len(shards) <= 1:
    write_file(os.path.join(out_dir, SINGLE_FILE), list(tensors), metadata)
    return [SINGLE_FILE]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for filename, shard in zip(files, shards):
    write_file(os.path.join(out_dir, filename), shard, metadata)
    weight_map.update({t.name: filename for t in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
  return files + [INDEX_FILE]


class SafetensorsReader:
  """Lazy access to every tensor of a HuggingFace folder (single file or sharded index)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
                              "save the model with save_pretrained(..., safe_serialization=True)")
    self._entries = {}
    for filename in files:
      path = os.path.join(directory, filename)
      with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
      for name, info in header.items():
        if name != "__metadata__":
          self._entries[name] = (path, 8 + size, info)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple:
    return tuple(self._entries[name][2]["shape"])

  def get(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise KeyError(f"{self.directory} has no tensor {name!r}")
    path, data_start, info = self._entries[name]
    begin, end = info["data_offsets"]
    dtype = NAME_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    if end == begin:
      return np.zeros(shape, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape))
