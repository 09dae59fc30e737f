"""`to_huggingface`: glmjax params -> a folder transformers (or plain torch) loads.

The folder holds `config.json`, safetensors weights (one file, or shards plus
an index past `max_shard_size`) and, when given, the tokenizer files. Weights
are produced tensor by tensor: each PyTorch tensor is built from one layer's
slice of the stacked glmjax leaves it comes from, fetched from the (possibly
sharded) device arrays just before its bytes are written, so the model is
never gathered on one host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Optional

import numpy as np

from glmjax.export import safetensors_io, targets, tokenizer_files
from glmjax.model import ModelConfig, is_spec, param_specs

TORCH_MODEL_FILE = "modeling_glmjax.py"


@dataclasses.dataclass(frozen=True)
class ExportResult:
  target: str  # targets.TARGETS key
  architecture: str  # config.json architectures[0]
  files: tuple  # file names written in out_dir


def flatten(tree: dict, prefix=()) -> dict:
  """{path tuple: leaf} of a nested dict of arrays."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def check_params(params: dict, config: ModelConfig) -> None:
  """Every leaf the config declares, with its shape, and nothing else (clear error before writing)."""
  import jax  # pylint: disable=import-outside-toplevel
  expected = {tuple(k.key for k in path): spec.shape for path, spec in
              jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]}
  actual = flatten(params)
  missing = sorted("/".join(p) for p in set(expected) - set(actual))
  extra = sorted("/".join(p) for p in set(actual) - set(expected))
  if missing or extra:
    raise ValueError(f"params do not match the ModelConfig: missing {missing}, unexpected {extra}; "
                     "pass the config the params were built with")
  wrong = [f"params[{'/'.join(path)}] has shape {tuple(np.shape(actual[path]))}, the ModelConfig "
           f"implies {tuple(shape)}" for path, shape in sorted(expected.items())
           if tuple(np.shape(actual[path])) != tuple(shape)]
  if wrong:
    raise ValueError("params do not match the ModelConfig:\n  " + "\n  ".join(wrong))


class HostSlices:
  """Host copies of single leaves or single layers of stacked leaves, one at a time.

  A stacked jax.Array (sharded or not) is indexed on device by a jitted dynamic
  index (one compile per leaf shape and sharding, not per layer) and only that
  slice is transferred, shard by shard into one numpy array. Going through the
  shards also keeps jax from caching a host copy on the param itself (as
  `np.asarray(param)` would, for the life of the params).
  """

  def __init__(self, params: dict):
    self.leaves = flatten(params)
    self._take = None

  def get(self, path: tuple, layer: Optional[int]) -> np.ndarray:
    leaf = self.leaves[path]
    if not _is_jax_array(leaf):
      array = np.asarray(leaf)
      return array if layer is None else array[layer]
    if not leaf.is_fully_addressable:
      raise ValueError(f"params[{'/'.join(path)}] spans several processes; export from one process "
                       "(`glmjax export` restores the checkpoint onto the local devices)")
    if layer is not None:
      leaf = self._layer(leaf, layer)
    return _from_shards(leaf)

  def _layer(self, leaf, layer: int):
    import jax  # pylint: disable=import-outside-toplevel
    if self._take is None:
      self._take = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False))
    return self._take(leaf, np.int32(layer))


def _from_shards(array) -> np.ndarray:
  """One host array from the addressable shards (each distinct block copied once)."""
  out = np.empty(array.shape, array.dtype)
  copied = set()
  for shard in array.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    if key not in copied:
      out[shard.index] = np.asarray(shard.data)
      copied.add(key)
  return out


def _is_jax_array(x) -> bool:
  try:
    import jax  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return isinstance(x, jax.Array)


def pending_tensors(params: dict, config: ModelConfig, target: targets.Target,
                    dtype: Optional[str]) -> list[safetensors_io.PendingTensor]:
  slices = HostSlices(params)
  out_dtype = targets._np_dtype(dtype or config.param_dtype)  # pylint: disable=protected-access

  def producer(tmap: targets.TensorMap):
    def produce():
      sources = [slices.get(path, tmap.layer) for path in tmap.sources]
      return np.asarray(tmap.to_hf(*sources)).astype(out_dtype, copy=False)
    return produce

  return [safetensors_io.PendingTensor(m.name, m.shape, out_dtype, producer(m))
          for m in target.tensors(config)]


def config_json(config: ModelConfig, target: targets.Target, dtype: str, special: dict) -> dict:
  architecture, model_type = targets.architecture(target, config)
  out = {"architectures": [architecture], "model_type": model_type}
  out.update(target.hf_config(config))
  out.update({key: special.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
  out["dtype"] = dtype
  out[targets.CONFIG_KEY] = dataclasses.asdict(config)
  return out


WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def remove_previous_export(out_dir: str) -> None:
  """Weights of an earlier export into the same folder (other shard count) would be mixed with the
  new ones by a loader; the reference model file would outlive a change of target."""
  for name in os.listdir(out_dir):
    if WEIGHT_FILE.fullmatch(name) or name == TORCH_MODEL_FILE:
      os.remove(os.path.join(out_dir, name))


def to_huggingface(params: dict, config: ModelConfig, out_dir: str, *, tokenizer: Any = None,
                   target: str = "auto", dtype: Optional[str] = None,
                   max_shard_size="5GB") -> ExportResult:
  """Writes `params` (contract, DESIGN.md section 9) as a folder loadable with
  `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` when a native class represents
  `config` exactly, else for `glmjax.export.torch_model.GLMJaxForCausalLM.from_pretrained`.

  target: "auto" (native if possible, else the torch reference model), "native" (native or a
    ValueError naming, for each class, the fields that block it), or one of targets.TARGETS.
  tokenizer: None, a SentencePiece model file, a seqio SentencePieceVocabulary, or a folder of
    HuggingFace tokenizer files (copied).
  dtype: dtype of the written weights ("float32", "bfloat16", "float16"); default param_dtype.
  """
  chosen = targets.select(config, target)
  check_params(params, config)
  if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r} must be 'float32', 'bfloat16' or 'float16'")
  os.makedirs(out_dir, exist_ok=True)
  remove_previous_export(out_dir)
  files = list(safetensors_io.write_sharded(out_dir, pending_tensors(params, config, chosen, dtype),
                                            max_shard_size))
  special = {}
  if tokenizer is not None:
    written, special = tokenizer_files.write(tokenizer, out_dir, config)
    files += written
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_json(config, chosen, dtype or config.param_dtype, special), f, indent=2)
  files.append("config.json")
  if chosen is targets.REFERENCE:
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "torch_model.py"),
                    os.path.join(out_dir, TORCH_MODEL_FILE))
    files.append(TORCH_MODEL_FILE)
  architecture, _ = targets.architecture(chosen, config)
  return ExportResult(chosen.name, architecture, tuple(files))
