"""`from_huggingface`: a local HuggingFace folder -> (glmjax params, ModelConfig).

Reads every class `to_huggingface` writes (LLaMA, GLM / GLM-4, Cohere,
GPT-NeoX, GPT-2, BLOOM, ChatGLM2/3 / GLM-4 `ChatGLMModel` and the glmjax torch
reference model) and the GLM family's own layouts (glmjax.export.families:
ChatGLM2/3 / GLM-4, ChatGLM-6B, GLM-10B / GLM-Large, GLM-130B SwissArmyTransformer
shards, merged on import). Weights: safetensors (single or indexed), PyTorch
`pytorch_model.bin` (single or indexed) and SAT `mp_rank_XX_model_states.pt`,
pickles only through torch.load(weights_only=True) (glmjax.export.torch_io). A folder written
by glmjax carries its ModelConfig's architecture fields in config.json
("glmjax_config"; runtime fields such as attention_impl get their defaults), so
import(export(params)) == params bit for bit; other folders get the
ModelConfig the transformers config describes. Tensors are read lazily from
memory-mapped safetensors, one at a time; a damaged file is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Optional

import numpy as np

from glmjax.export import families, safetensors_io, targets, torch_io
from glmjax.model import ModelConfig, is_spec, param_specs
from glmjax.model.config import RUNTIME_FIELDS, architecture_fields

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not parameters.
IGNORED_TENSORS = (r".*\.attn\.bias$", r".*\.attn\.masked_bias$", r".*rotary_emb\.inv_freq$",
                   r".*attention\.bias$", r".*attention\.masked_bias$",
                   r".*rotary_pos_emb\.inv_freq$")


def read_config_json(hf_dir: str) -> dict:
  """config.json; for a SwissArmyTransformer folder (a `latest` file) SAT's model_config.json."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path) and torch_io.is_sat_folder(hf_dir):
    sat = os.path.join(hf_dir, families.SAT_CONFIG)
    if not os.path.exists(sat):
      raise FileNotFoundError(
          f"{sat} is missing: a SwissArmyTransformer checkpoint needs its model arguments; for "
          f"GLM-130B write {json.dumps(families.GLM130B_CONFIG)} (configs/model_glm_130b.sh)")
    return safetensors_io.read_json(sat, families.SAT_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json; pass a folder written by save_pretrained "
                            "or glmjax export")
  return safetensors_io.read_json(path, "config.json")


def target_for(raw: dict) -> targets.Target:
  family = families.detect(raw)
  if family is not None:
    return family
  model_type = raw.get("model_type")
  if model_type not in targets.MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not importable; supported: "
                     f"{sorted(targets.MODEL_TYPES)}")
  return targets.TARGETS[targets.MODEL_TYPES[model_type]]


def stored_config(raw: dict) -> Optional[ModelConfig]:
  """The ModelConfig glmjax export stored in config.json, if any. Runtime fields (RUNTIME_FIELDS)
  get ModelConfig defaults: exports store none, older ones did and those values are ignored."""
  values = raw.get(targets.CONFIG_KEY)
  if values is None:
    return None
  names = {f.name for f in dataclasses.fields(ModelConfig)} - RUNTIME_FIELDS
  unknown = sorted(set(values) - names - RUNTIME_FIELDS)
  if unknown:
    log.warning("config.json %s has fields this glmjax does not know: %s (ignored)",
                targets.CONFIG_KEY, unknown)
  return ModelConfig(**{k: v for k, v in values.items() if k in names})


def _matches(expected, actual) -> bool:
  if isinstance(expected, dict):
    return isinstance(actual, dict) and all(_matches(v, actual.get(k)) for k, v in expected.items())
  if isinstance(expected, float) or isinstance(actual, float):
    return actual is not None and float(expected) == float(actual)
  return expected == actual


def stale_fields(config: ModelConfig, target: targets.Target, raw: dict) -> list[str]:
  """config.json keys edited since export (the stored ModelConfig no longer describes them). Keys
  a later save_pretrained dropped (transformers 4 aliases) are not evidence of an edit."""
  return [key for key, value in target.hf_config(config).items()
          if key in raw and not _matches(value, raw[key])]


def native_config(hf_dir: str, target: targets.Target) -> ModelConfig:
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("importing a HuggingFace checkpoint needs transformers: "
                      "pip install 'glmjax[torch]'") from e
  return target.model_config(transformers.AutoConfig.from_pretrained(hf_dir))


def leaf_groups(maps: list) -> list[list]:
  """The TensorMaps in groups that fill disjoint sets of glmjax leaves: a fused tensor (qkv,
  [gate; up]) joins the leaves it feeds, so each checkpoint tensor is read exactly once and a
  group's leaves are complete when its last tensor is read. Order: first appearance."""
  parent = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for tmap in maps:
    for path in tmap.sources[1:]:
      parent[find(path)] = find(tmap.sources[0])
  groups = {}
  for tmap in maps:
    if tmap.sources:
      groups.setdefault(find(tmap.sources[0]), []).append(tmap)
  return list(groups.values())


def _specs(config: ModelConfig) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  return {tuple(k.key for k in path): spec for path, spec in
          jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]}


def check_tensors(reader, config: ModelConfig, target: targets.Target):
  """What needs no tensor data: every tensor the table names is present with the shape the config
  implies and no other tensor is stored; tensors that must be zeros are zeros. Returns (the
  table, the stored copies of a tied output projection, to compare with the embedding)."""
  maps = target.tensors(config)
  for tmap in maps:
    if tmap.name not in reader:
      raise targets.WeightMismatch(f"{reader.directory} has no tensor {tmap.name!r}, which "
                                   f"{target.architecture} with this config needs")
    shape = tuple(reader.shape(tmap.name))
    if shape != tuple(tmap.shape):
      raise targets.WeightMismatch(f"{reader.directory}: {tmap.name} has shape {shape}, the config "
                                   f"implies {tuple(tmap.shape)}; the weights and config.json are of "
                                   "different models")
  used = {tmap.name for tmap in maps}
  unexpected = [n for n in reader.names() if n not in used
                and not any(re.fullmatch(p, n) for p in IGNORED_TENSORS)]
  tied_copies = [n for n in unexpected if config.tie_embeddings and _is_head_name(n)]
  unexpected = [n for n in unexpected if n not in tied_copies]
  if unexpected:
    raise targets.WeightMismatch(f"{reader.directory} has tensors the config does not use: "
                                 f"{unexpected[:8]}")
  for tmap in maps:
    if not tmap.sources:  # a tensor that exists only as zeros: its from_hf raises otherwise
      tmap.from_hf(reader.get(tmap.name))
  return maps, tied_copies


def iter_slices(reader, config: ModelConfig, target: targets.Target):
  """Yields (param path, layer index or None, numpy slice): each checkpoint tensor read once,
  re-laid and handed over before the next is read, so host memory holds one checkpoint tensor and
  its slices, never a whole leaf (a writer that stores layer slices into the stacked leaves, e.g.
  a tensorstore array, imports a model larger than host memory). A slot two tensors fill (a tied
  head stored beside the embedding) must agree; the first is read again to compare."""
  specs = _specs(config)
  maps, tied_copies = check_tensors(reader, config, target)
  dtype = np.dtype(_np_name(config.param_dtype))
  writer = {}
  for tmap in maps:
    for path, value in tmap.from_hf(reader.get(tmap.name)).items():
      slot = (path, tmap.layer)
      if slot in writer:
        if not np.array_equal(writer[slot].from_hf(reader.get(writer[slot].name))[path], value):
          raise targets.WeightMismatch(f"{tmap.name} differs from {writer[slot].name}, which holds "
                                       f"params[{'/'.join(path)}] too (the config says they are one "
                                       "parameter)")
        continue
      writer[slot] = tmap
      yield path, tmap.layer, np.asarray(value).astype(dtype, copy=False)
  for name in tied_copies:
    if not np.array_equal(reader.get(name), reader.get(writer[(("embed", "embedding"), None)].name)):
      raise targets.WeightMismatch(f"{reader.directory} has tensors the config does not use: "
                                   f"[{name!r}] (it differs from the tied embedding)")
  for path, spec in specs.items():
    layers = [None] if spec.axes[:1] != ("layers",) else range(config.num_layers)
    if any((path, layer) not in writer for layer in layers):
      raise AssertionError(f"params[{'/'.join(path)}] not fully written by the {target.name} table")


def iter_leaves(reader, config: ModelConfig, target: targets.Target):
  """Yields (param path, numpy leaf) one group of leaves at a time (see `leaf_groups`), reading
  each checkpoint tensor once, lazily: host memory holds one group's leaves (e.g. the stacked
  wq / wk / wv of every layer) plus the tensor being re-laid, never the whole model.

  Checks first what needs no data (every tensor present with the shape the config implies, no
  unused tensor), then, per tensor, that a slot written twice agrees."""
  specs = _specs(config)
  maps, tied_copies = check_tensors(reader, config, target)
  dtype = np.dtype(_np_name(config.param_dtype))
  seen = set()
  for group in leaf_groups(maps):
    arrays, filled = {}, {}
    for tmap in group:
      for path, value in tmap.from_hf(reader.get(tmap.name)).items():
        spec = specs[path]
        if path not in arrays and _adoptable(value, tmap.layer, spec.shape):
          arrays[path], filled[path] = value, {"all"}  # a whole leaf this group owns: no copy
          continue
        if path not in arrays:
          arrays[path], filled[path] = np.empty(spec.shape, value.dtype), set()
        slot = tmap.layer if tmap.layer is not None else ()
        if np.shape(value) != np.shape(arrays[path][slot]):
          raise AssertionError(f"{tmap.name} -> {'/'.join(path)}: {np.shape(value)} vs "
                               f"{np.shape(arrays[path][slot])}")
        key = tmap.layer if tmap.layer is not None else "all"
        if key in filled[path]:
          if not np.array_equal(arrays[path][slot], value):
            raise targets.WeightMismatch(f"{tmap.name} differs from another tensor that holds "
                                         f"params[{'/'.join(path)}] (the config says they are one "
                                         "parameter)")
          continue
        arrays[path][slot] = value
        filled[path].add(key)
    for path, array in arrays.items():
      expected = {"all"} if specs[path].axes[:1] != ("layers",) else set(range(config.num_layers))
      if filled[path] != expected:
        raise AssertionError(f"params[{'/'.join(path)}] not fully written by the {target.name} table")
      if path == ("embed", "embedding"):
        for name in tied_copies:
          if not np.array_equal(reader.get(name), array):
            raise targets.WeightMismatch(f"{reader.directory} has tensors the config does not use: "
                                         f"[{name!r}] (it differs from the tied embedding)")
      seen.add(path)
      yield path, array.astype(dtype, copy=False)
      del array
    del arrays
  missing = sorted("/".join(p) for p in set(specs) - seen)
  if missing:
    raise AssertionError(f"params {missing} not written by the {target.name} table")


def _adoptable(value, layer, shape) -> bool:
  """A whole (unstacked) leaf in a fresh, writeable array of its own (e.g. the embedding merged
  from tensor-parallel shards) is kept as it is instead of copied."""
  return (layer is None and isinstance(value, np.ndarray) and value.shape == tuple(shape)
          and value.flags.owndata and value.flags.writeable)


def assemble(reader, config: ModelConfig, target: targets.Target) -> dict:
  """Every glmjax leaf from the checkpoint tensors (`iter_leaves`), as a nested dict."""
  return _nest(dict(iter_leaves(reader, config, target)))


def _is_head_name(name: str) -> bool:
  """A tied checkpoint may still store the output projection; it must equal the embedding."""
  return name.endswith(("lm_head.weight", "embed_out.weight"))


def _np_name(dtype: str):
  return targets._np_dtype(dtype)  # pylint: disable=protected-access


def _nest(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def from_huggingface(hf_dir: str, *, param_dtype: Optional[str] = None,
                     use_stored_config: bool = True) -> tuple[dict, ModelConfig]:
  """(params as nested numpy arrays, ModelConfig) of a local HuggingFace folder (contract).

  param_dtype: cast the params (and set ModelConfig.param_dtype), e.g. "float32" to continue
    training a bfloat16 checkpoint with float32 master weights. Default: as stored.
  use_stored_config: prefer the exact ModelConfig a glmjax export stored in config.json.
  """
  raw = read_config_json(hf_dir)
  target = target_for(raw)
  with torch_io.open_weights(hf_dir) as reader:
    params, config = _read(hf_dir, raw, target, reader, use_stored_config)
  if param_dtype is not None:
    config = dataclasses.replace(config, param_dtype=param_dtype)
    params = _cast(params, param_dtype)
  return params, config


def _read(hf_dir: str, raw: dict, target: targets.Target, reader, use_stored_config: bool):
  """(params, config): under the stored glmjax config when it still describes the folder."""
  if isinstance(target, families.Family) and not (target.exportable and targets.CONFIG_KEY in raw
                                                   and use_stored_config):
    target, config = target.configure(raw, reader, _source(hf_dir, raw))
    config = dataclasses.replace(config, param_dtype=_family_dtype(raw, reader, target, config))
    return assemble(reader, config, target), config
  config = stored_config(raw) if use_stored_config or target is targets.REFERENCE else None
  if target is targets.REFERENCE and config is None:
    raise ValueError(f"{hf_dir}/config.json has model_type 'glmjax' but no {targets.CONFIG_KEY}")
  if config is not None and target is not targets.REFERENCE:
    stale = stale_fields(config, target, raw)
    if stale:
      log.warning("config.json fields %s changed since glmjax export; importing as a plain %s model",
                  stale, target.architecture)
      config = None
  params = None
  if config is not None:
    try:
      params = assemble(reader, config, target)
    except targets.WeightMismatch as e:
      if target is targets.REFERENCE:
        raise
      log.warning("weights no longer match the stored glmjax config (%s); importing as a plain %s "
                  "model", e, target.architecture)
      config = None
  if config is None and isinstance(target, families.Family):
    return _read(hf_dir, raw, target, reader, use_stored_config=False)
  if config is None:
    config = _with_dtype(native_config(hf_dir, target), raw)
    params = assemble(reader, config, target)
  return params, config


@contextlib.contextmanager
def open_checkpoint(hf_dir: str, *, use_stored_config: bool = True):
  """(reader, target, ModelConfig) of a folder, for `iter_slices` / `iter_leaves` (streaming
  import); the ModelConfig is the one `from_huggingface` would return, without reading weights
  beyond the checks of `check_tensors`. The reader is closed on exit."""
  raw = read_config_json(hf_dir)
  target = target_for(raw)
  with torch_io.open_weights(hf_dir) as reader:
    yield (reader,) + _plan(hf_dir, raw, target, reader, use_stored_config)


def _plan(hf_dir: str, raw: dict, target: targets.Target, reader, use_stored_config: bool):
  if isinstance(target, families.Family) and not (target.exportable and targets.CONFIG_KEY in raw
                                                   and use_stored_config):
    target, config = target.configure(raw, reader, _source(hf_dir, raw))
    return target, dataclasses.replace(config, param_dtype=_family_dtype(raw, reader, target, config))
  config = stored_config(raw) if use_stored_config or target is targets.REFERENCE else None
  if config is not None and target is not targets.REFERENCE and stale_fields(config, target, raw):
    config = None
  if config is not None:
    try:
      check_tensors(reader, config, target)
      return target, config
    except targets.WeightMismatch:
      if target is targets.REFERENCE:
        raise
  if isinstance(target, families.Family):
    return _plan(hf_dir, raw, target, reader, use_stored_config=False)
  return target, _with_dtype(native_config(hf_dir, target), raw)


def _source(hf_dir: str, raw: dict) -> str:
  name = "config.json" if os.path.exists(os.path.join(hf_dir, "config.json")) else families.SAT_CONFIG
  return os.path.join(hf_dir, name)


def _family_dtype(raw: dict, reader, target: targets.Target, config: ModelConfig) -> str:
  """The dtype the weights are stored in: config.json's torch_dtype, else the embedding's."""
  stored = raw.get("dtype") or raw.get("torch_dtype")
  if stored is None:
    first = target.tensors(dataclasses.replace(config, num_layers=1))[0].name
    stored = str(np.dtype(reader.get(first).dtype)) if first in reader else "float32"
  if stored not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"{_source(reader.directory, raw)}: dtype {stored!r} is not float32, bfloat16 "
                     "or float16")
  return stored


def _with_dtype(config: ModelConfig, raw: dict) -> ModelConfig:
  """Params keep the dtype they are stored in."""
  stored = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  if stored not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.json dtype={stored!r} is not float32, bfloat16 or float16")
  return dataclasses.replace(config, param_dtype=stored)


def _cast(tree: dict, dtype: str) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(_np_name(dtype)) for k, v in tree.items()}


# --- the model's identity as gin -----------------------------------------------------------------

def model_gin(config: ModelConfig, source: str) -> str:
  """gin bindings of the model's identity (every ModelConfig field but RUNTIME_FIELDS), in the
  style of experiments/models/*.gin. It is parsed after the experiment's files, so a runtime field
  here would silently override the experiment's attention_impl / dtype / remat_policy."""
  lines = [f"# Imported from {source} by `glmjax import`. Runtime fields ("
           f"{', '.join(sorted(RUNTIME_FIELDS))}) are left to the experiment's gin files.", ""]
  lines += [f"ModelConfig.{name} = {value!r}" for name, value in architecture_fields(config).items()]
  return "\n".join(lines) + "\n"
