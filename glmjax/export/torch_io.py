"""PyTorch checkpoints read safely: `.bin` / `.pt` pickles only through `torch.load(weights_only=True)`.

Three layouts, each with the same lazy reader interface as
`safetensors_io.SafetensorsReader` (`names`, `in`, `shape`, `get`, `directory`):

  * `pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json` (what
    `save_pretrained(safe_serialization=False)` writes; ChatGLM-6B / ChatGLM2-6B /
    GLM-10B on the HF hub ship these);
  * SwissArmyTransformer (SAT) tensor-parallel checkpoints: a folder with `latest`
    (the iteration) and `<iteration>/mp_rank_XX_model_states.pt`, each
    `{"module": state_dict}` (sat/training/model_io.py `save_checkpoint`, line 176;
    GLM-130B's tools/convert_tp.py `create_checkpoint` writes the same). `SatReader`
    merges the shards of one tensor when it is read (`merge_tensor_parallel`).

Every pickle is opened with `weights_only=True` (tensors and plain containers, never
arbitrary objects) and memory-mapped where the file is in torch's zip format, so a
tensor's bytes are read only when it is asked for: host memory is bounded by the
largest (merged) tensor, not the checkpoint. A pickle that needs more than
`weights_only` allows is refused with a ValueError naming the file.
"""

from __future__ import annotations

import os
import re

import numpy as np

from glmjax.export import safetensors_io

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAT_LATEST = "latest"
SAT_SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt$")

# GLM-130B tools/convert_tp.py lines 11-28 (SEQUENTIAL_LAYERS, GLU_LAYERS, LAYER_CONCAT_DIM):
# replicated tensors, the [a; b] GLU halves split per rank, and the row-parallel weights.
SAT_REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                  "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                  "mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq",
                  "final_layernorm.weight", "final_layernorm.bias")
SAT_GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
SAT_ROW_PARALLEL = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading PyTorch .bin / .pt checkpoints needs torch: pip install 'glmjax[torch]'"
                      ) from e
  return torch


def load_state(path: str) -> dict:
  """torch.load(path, weights_only=True), memory-mapped when the file allows it; anything that is
  not tensors in plain containers is a ValueError naming the file."""
  torch = _torch()
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    try:
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e) and "zip" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} holds objects beyond tensors and plain containers ({first}); glmjax "
                     "reads pickles only with torch.load(weights_only=True): re-save it as "
                     "torch.save(model.state_dict()) or as safetensors") from e
  except (RuntimeError, EOFError, OSError) as e:
    raise safetensors_io.unreadable(path, "PyTorch checkpoint", e) from e


def to_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy (bfloat16 as ml_dtypes.bfloat16), without a float32 detour."""
  torch = _torch()
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.contiguous().numpy()


def _tensors_of(state, path: str) -> dict:
  if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
    state = state["module"]
  if not isinstance(state, dict):
    raise safetensors_io.unreadable(path, "PyTorch state dict", f"holds a {type(state).__name__}")
  torch = _torch()
  return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class TorchBinReader:
  """`pytorch_model.bin` or the shards of `pytorch_model.bin.index.json`, opened lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    self._file_of, self._states = {}, {}
    index = os.path.join(directory, BIN_INDEX)
    if os.path.exists(index):
      weight_map = safetensors_io.read_json(index, "PyTorch index").get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise safetensors_io.unreadable(index, "PyTorch index", "no \"weight_map\" of tensor names")
      for filename in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(directory, filename)):
          raise ValueError(f"{os.path.join(directory, filename)} is missing: {index} lists it as a "
                           f"shard of the weights; {safetensors_io.REDOWNLOAD}")
      self._file_of = {name: os.path.join(directory, f) for name, f in weight_map.items()}
    else:
      path = os.path.join(directory, BIN_FILE)
      self._file_of = {name: path for name in self._state(path)}

  def _state(self, path: str) -> dict:
    if path not in self._states:
      self._states[path] = _tensors_of(load_state(path), path)
    return self._states[path]

  def names(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def _tensor(self, name: str):
    if name not in self._file_of:
      raise KeyError(f"{self.directory} has no tensor {name!r}")
    path = self._file_of[name]
    state = self._state(path)
    if name not in state:
      raise safetensors_io.unreadable(path, "shard of this checkpoint",
                                      f"{BIN_INDEX} lists {name!r}, which it does not hold")
    return state[name]

  def shape(self, name: str) -> tuple:
    return tuple(self._tensor(name).shape)

  def get(self, name: str) -> np.ndarray:
    return to_numpy(self._tensor(name))

  def close(self) -> None:
    self._states.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- SwissArmyTransformer tensor-parallel shards -----------------------------------------------

def sat_shard_files(directory: str) -> list[str]:
  """The mp_rank_XX files of the iteration `latest` names, in rank order (ranks 0..n-1 all present)."""
  latest = os.path.join(directory, SAT_LATEST)
  with open(latest, encoding="utf-8") as f:
    iteration = f.read().strip()
  folder = os.path.join(directory, iteration)
  if not iteration or not os.path.isdir(folder):
    raise ValueError(f"{latest} names iteration {iteration!r}, but {folder} is not a folder; "
                     "point --from at the SAT checkpoint folder that holds `latest`")
  ranks = {}
  for name in os.listdir(folder):
    match = SAT_SHARD.fullmatch(name)
    if match:
      ranks[int(match.group(1))] = os.path.join(folder, name)
  if not ranks:
    raise ValueError(f"{folder} holds no mp_rank_XX_model_states.pt shards")
  missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
  if missing:
    raise ValueError(f"{folder} lacks mp_rank_{missing[0]:02d}_model_states.pt of the "
                     f"{max(ranks) + 1} tensor-parallel shards; {safetensors_io.REDOWNLOAD}")
  return [ranks[r] for r in range(len(ranks))]


def sat_kind(name: str) -> tuple[str, int]:
  """("replicated" | "glu" | "concat", concat dim) of a SAT tensor, as convert_tp.py line 117."""
  short = ".".join(name.split(".")[3 if name.startswith("transformer.layers") else 1:])
  if short in SAT_REPLICATED:
    return "replicated", 0
  if short in SAT_GLU:
    return "glu", 0
  return "concat", SAT_ROW_PARALLEL.get(short, 0)


def merge_tensor_parallel(name: str, parts: list) -> np.ndarray:
  """One tensor from its tensor-parallel parts (GLM-130B tools/convert_tp.py `merge_weights`,
  lines 56-77 with target_tp=1): replicated tensors are rank 0's, GLU weights [a_r; b_r] become
  [a_0 .. a_n; b_0 .. b_n], the rest concatenate on their split dim (0, or 1 for row-parallel)."""
  kind, dim = sat_kind(name)
  if kind == "replicated":
    return parts[0]
  if kind == "glu":
    halves = [np.split(p, 2, axis=0) for p in parts]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  return np.concatenate(parts, axis=dim)


class SatReader:
  """A SAT checkpoint folder: tensors merged across the mp_rank shards when read."""

  def __init__(self, directory: str):
    self.directory = directory
    self.files = sat_shard_files(directory)
    self._states = [_tensors_of(load_state(path), path) for path in self.files]
    names = set(self._states[0])
    for path, state in zip(self.files[1:], self._states[1:]):
      if set(state) != names:
        extra = sorted(set(state) ^ names)[:3]
        raise ValueError(f"{path} and {self.files[0]} hold different tensors ({extra}); the shards "
                         f"are of different checkpoints; {safetensors_io.REDOWNLOAD}")
    self._names = sorted(names)

  @property
  def tensor_parallel(self) -> int:
    return len(self.files)

  def names(self) -> list[str]:
    return list(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._states[0]

  def shape(self, name: str) -> tuple:
    shapes = [tuple(s[name].shape) for s in self._states]
    kind, dim = sat_kind(name)
    if kind == "replicated":
      return shapes[0]
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    return tuple(out)

  def get(self, name: str) -> np.ndarray:
    if name not in self:
      raise KeyError(f"{self.directory} has no tensor {name!r}")
    parts = [to_numpy(s[name]) for s in self._states]
    return merge_tensor_parallel(name, parts)

  def close(self) -> None:
    self._states = [{} for _ in self._states]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def is_sat_folder(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, SAT_LATEST))


REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def open_weights(directory: str):
  """The reader for a folder's weights: safetensors (single or indexed) first, then
  pytorch_model.bin (single or indexed), then a SAT checkpoint; anything else is refused."""
  names = set(os.listdir(directory))
  if {safetensors_io.SINGLE_FILE, safetensors_io.INDEX_FILE} & names:
    return safetensors_io.SafetensorsReader(directory)
  if {BIN_FILE, BIN_INDEX} & names:
    return TorchBinReader(directory)
  if SAT_LATEST in names:
    return SatReader(directory)
  pickles = sorted(n for n in names if n.endswith(REFUSED_SUFFIXES))
  hint = (f" ({', '.join(pickles[:3])} are not read: only {BIN_FILE}, its index and SAT "
          "mp_rank_XX_model_states.pt shards are)") if pickles else ""
  raise FileNotFoundError(f"{directory} has none of {safetensors_io.SINGLE_FILE}, "
                          f"{safetensors_io.INDEX_FILE}, {BIN_FILE}, {BIN_INDEX} or a SAT "
                          f"`{SAT_LATEST}` file{hint}; save the model with save_pretrained")
