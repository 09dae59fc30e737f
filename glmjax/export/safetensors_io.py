"""Streaming safetensors: write one tensor at a time; read lazily with the `safetensors` package.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header size N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
"__metadata__"), then the raw little-endian tensor bytes (this module assumes a
little-endian host, as every jax platform is). Every offset is known from the
shapes alone, so a file is written header first and then
tensor by tensor: only the tensor being written is ever in host memory, which
is what lets a model larger than one host's memory be exported from sharded
device arrays (`safetensors.numpy.save_file` needs every tensor at once). Large
models are split into shards named as transformers expects
(`model-00001-of-00004.safetensors`) with a `model.safetensors.index.json`.

Reading goes through `safetensors.safe_open` (headers validated, memory-mapped,
bfloat16 as ml_dtypes.bfloat16); a truncated or corrupt file, index or missing
shard is a ValueError that names the file and says to re-download or re-export it.
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
  match = None
  if not isinstance(size, bool):
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not match or float(match.group(1)) <= 0:
    raise ValueError(f"max_shard_size={size!r} is not a positive size like '5GB', '500MB' or "
                     "1000000")
  unit = (match.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return max(1, int(float(match.group(1)) * scale))


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


REDOWNLOAD = "re-download or re-export it"


def unreadable(path: str, what: str, reason) -> ValueError:
  """The error for a damaged file: which file, what it should be, why it is not, what to do."""
  return ValueError(f"{path} is not a readable {what} (truncated?): {reason}; {REDOWNLOAD}")


def read_json(path: str, what: str = "JSON file") -> dict:
  """A JSON object from `path`; a truncated or corrupt file is a ValueError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise unreadable(path, what, e) from e
  if not isinstance(value, dict):
    raise unreadable(path, what, f"holds a {type(value).__name__}, not a JSON object")
  return value


def weight_files(directory: str) -> dict:
  """{file name: tensor names the index assigns to it, or None for the single file} of a folder:
  the sharded index when present, else `model.safetensors`."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise unreadable(index, "safetensors index", "no \"weight_map\" of tensor names to files")
    files = {}
    for name, filename in weight_map.items():
      files.setdefault(filename, set()).add(name)
    for filename in files:
      if not os.path.exists(os.path.join(directory, filename)):
        raise ValueError(f"{os.path.join(directory, filename)} is missing: {index} lists it as a "
                         f"shard of the weights; {REDOWNLOAD}")
    return files
  if os.path.exists(os.path.join(directory, SINGLE_FILE)):
    return {SINGLE_FILE: None}
  raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
                          "save the model with save_pretrained(..., safe_serialization=True)")


def open_file(path: str):
  """A `safetensors.safe_open` handle (memory-mapped, numpy arrays incl. ml_dtypes.bfloat16)."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise unreadable(path, "safetensors file", e) from e


class SafetensorsReader:
  """Lazy access to every tensor of a HuggingFace folder (single file or sharded index).

  Only the headers are read up front (with the `safetensors` package, which also checks that
  each file is as long as its header says); `get` reads one tensor from its memory map.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._handles, self._file_of = {}, {}
    for filename, listed in weight_files(directory).items():
      path = os.path.join(directory, filename)
      handle = self._handles[path] = open_file(path)
      names = set(handle.keys())
      if listed is not None and not listed <= names:
        raise unreadable(path, "shard of this checkpoint", f"{os.path.join(directory, INDEX_FILE)} "
                         f"lists tensors it does not hold: {sorted(listed - names)[:5]}")
      self._file_of.update({name: path for name in names})

  def names(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def shape(self, name: str) -> tuple:
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    if name not in self._file_of:
      raise KeyError(f"{self.directory} has no tensor {name!r}")
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    path = self._file_of[name]
    try:
      return self._handles[path].get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise unreadable(path, "safetensors file", f"tensor {name!r}: {e}") from e

  def close(self) -> None:
    self._handles.clear()  # safe_open handles unmap when dropped

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
