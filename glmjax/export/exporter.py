"""`to_huggingface`: glmjax params -> a folder transformers (or plain torch) loads.

The folder holds `config.json`, safetensors weights (one file, or shards plus
an index past `max_shard_size`) and, when given, the tokenizer files. Weights
are produced tensor by tensor: each PyTorch tensor is built from one layer's
slice of the stacked glmjax leaves it comes from, fetched from the (possibly
sharded) device arrays just before its bytes are written, so the model is
never gathered on one host.

Nothing written is lost: the export goes into a sibling folder that is renamed
over `out_dir` only when complete, and `out_dir` is replaced only when it is
new, empty or an unmodified earlier export (the files its `glmjax_export.json`
manifest lists), unless overwrite=True.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import stat
from typing import Any, Optional

import numpy as np

from glmjax.export import safetensors_io, targets, tokenizer_files
from glmjax.model import ModelConfig, is_spec, param_specs
from glmjax.model.config import architecture_fields

log = logging.getLogger(__name__)
TORCH_MODEL_FILE = "modeling_glmjax.py"


@dataclasses.dataclass(frozen=True)
class ExportResult:
  target: str  # targets.TARGETS key
  architecture: str  # config.json architectures[0]
  files: tuple  # file names written in out_dir, the manifest (MANIFEST_FILE) last


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
  if getattr(target, "remote_code", None):
    out["torch_dtype"] = dtype  # read by the remote modeling code (_config_to_kwargs)
  out[targets.CONFIG_KEY] = architecture_fields(config)
  if target is targets.REFERENCE:
    out["auto_map"] = dict(AUTO_MAP)
  return out


# The reference model as transformers remote code: AutoModelForCausalLM.from_pretrained(out,
# trust_remote_code=True) imports modeling_glmjax.py from the folder and builds these classes.
AUTO_MAP = {"AutoConfig": "modeling_glmjax.GLMJaxHFConfig",
            "AutoModelForCausalLM": "modeling_glmjax.GLMJaxForCausalLM"}
MANIFEST_FILE = "glmjax_export.json"
MANIFEST_FORMAT = "glmjax-export"
DTYPES = ("float32", "bfloat16", "float16")
FIX = ("choose an empty or new folder, or pass overwrite=True (--overwrite) to replace the folder "
       "and everything in it")


# --- What may be replaced ---------------------------------------------------------------------

def manifest(folder: str, files: list, target: str, architecture: str) -> dict:
  """The record that makes a folder "a glmjax export": every file written, with the size and
  modification time it had when written (a later edit or save_pretrained changes one of them)."""
  stats = {name: os.stat(os.path.join(folder, name)) for name in files}
  return {"format": MANIFEST_FORMAT, "version": 1, "target": target, "architecture": architecture,
          "files": {name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
                    for name, st in stats.items()}}


def foreign_reason(folder: str) -> Optional[str]:
  """None when replacing `folder` loses nothing glmjax export did not write (it is missing, empty,
  or holds exactly an unmodified earlier export, perhaps minus some files); else why not."""
  if not os.path.lexists(folder):
    return None
  entries = sorted(os.listdir(folder))
  if not entries:
    return None
  if MANIFEST_FILE not in entries:
    return f"it holds {_some(entries)} and no {MANIFEST_FILE}"
  try:
    with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
      files = json.load(f)["files"]
    files = {name: (int(v["size"]), int(v["mtime_ns"])) for name, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its {MANIFEST_FILE} is unreadable ({e!r})"
  extra = [name for name in entries if name not in files and name != MANIFEST_FILE]
  if extra:
    return f"it also holds {_some(extra)}, which glmjax export did not write"
  for name in entries:
    if name == MANIFEST_FILE:
      continue
    st = os.lstat(os.path.join(folder, name))
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != files[name]:
      return f"{name} changed since glmjax export wrote it"
  return None


def _some(names: list) -> str:
  shown = ", ".join(names[:5])
  return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_out_dir(out_dir: str, overwrite: bool = False, folder: Optional[str] = None) -> None:
  """ValueError unless the export may replace `out_dir` (checked at `folder`, default its real
  path). overwrite=True allows foreign files, never foreign subfolders: an export has none, so
  a folder with one (a git clone, a workdir, a home folder) is never deleted."""
  folder = folder or os.path.realpath(out_dir)
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise ValueError(f"out_dir {out_dir} is a file, not a folder; choose a folder for the export")
  cwd = os.path.realpath(os.getcwd())
  if cwd == folder or cwd.startswith(folder.rstrip(os.sep) + os.sep):
    raise ValueError(f"out_dir {out_dir or '.'} holds the current directory; the export replaces "
                     "the whole folder, so choose a new folder (e.g. a subfolder)")
  reason = foreign_reason(folder)
  if reason is None:
    return
  if not overwrite:
    raise ValueError(f"out_dir {out_dir} is not empty and not an unmodified glmjax export ({reason}); "
                     + FIX)
  subfolders = sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
  if subfolders:
    raise ValueError(f"out_dir {out_dir} holds folders ({_some(subfolders)}), which an export never "
                     "writes, so it is not replaced even with overwrite=True; choose an empty or "
                     "new folder")


def check_export_arguments(out_dir: str, *, target: str = "auto", dtype: Optional[str] = None,
                           max_shard_size="5GB", overwrite: bool = False, tokenizer: Any = None) -> int:
  """Every check of `to_huggingface` that needs no params (a CLI runs it before restoring a
  checkpoint): the target's name, dtype, max_shard_size, tokenizer and out_dir. Returns the
  shard size in bytes. Whether the target represents the config is checked by `to_huggingface`."""
  if target not in ("auto", "native") and target not in targets.TARGETS:
    raise ValueError(f"unknown export target {target!r}; choose one of "
                     f"{['auto', 'native'] + list(targets.TARGETS)}")
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} must be 'float32', 'bfloat16' or 'float16'")
  max_shard_bytes = safetensors_io.parse_size(max_shard_size)
  tokenizer_files.check(tokenizer)
  check_out_dir(out_dir, overwrite)
  return max_shard_bytes


# --- Writing ----------------------------------------------------------------------------------

def write_folder(folder: str, params: dict, config: ModelConfig, chosen: targets.Target,
                 tokenizer: Any, dtype: Optional[str], max_shard_bytes: int) -> list[str]:
  """Weights, tokenizer, config.json (and the reference model file) into `folder`; their names."""
  files = list(safetensors_io.write_sharded(folder, pending_tensors(params, config, chosen, dtype),
                                            max_shard_bytes))
  special = {}
  if tokenizer is not None:
    written, special = tokenizer_files.write(tokenizer, folder, config)
    files += written
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config_json(config, chosen, dtype or config.param_dtype, special), f, indent=2)
  files.append("config.json")
  if chosen is targets.REFERENCE:
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "torch_model.py"),
                    os.path.join(folder, TORCH_MODEL_FILE))
    files.append(TORCH_MODEL_FILE)
  return files


def sibling(folder: str, kind: str) -> str:
  """A new name next to `folder` (same filesystem, so renames between them are atomic)."""
  return f"{folder}.glmjax-{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def swap_in(staging: str, folder: str, recheck) -> None:
  """Puts the complete `staging` folder at `folder`. An existing `folder` is renamed aside,
  `recheck(aside)` confirms it still may be replaced, the new one is renamed into place and only
  then is the old one deleted; on any failure the old one is renamed back, untouched."""
  if not os.path.lexists(folder):
    os.rename(staging, folder)
    return
  aside = sibling(folder, "old")
  os.rename(folder, aside)
  try:
    recheck(aside)
    os.rename(staging, folder)
  except BaseException:
    os.rename(aside, folder)
    raise
  try:
    shutil.rmtree(aside)
  except OSError as e:
    log.warning("exported to %s; could not delete the previous export moved to %s (%s)",
                folder, aside, e)


def to_huggingface(params: dict, config: ModelConfig, out_dir: str, *, tokenizer: Any = None,
                   target: str = "auto", dtype: Optional[str] = None,
                   max_shard_size="5GB", overwrite: bool = False) -> ExportResult:
  """Writes `params` (contract, DESIGN.md section 9) as a folder loadable with
  `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` when a native class represents
  `config` exactly, else with `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`
  or `GLMJaxForCausalLM.from_pretrained` from the modeling_glmjax.py written beside the weights.

  target: "auto" (native if possible, else the torch reference model), "native" (native or a
    ValueError naming, for each class, the fields that block it), or one of targets.TARGETS.
  tokenizer: None, a SentencePiece model file, a seqio SentencePieceVocabulary, or a folder of
    HuggingFace tokenizer files (copied).
  dtype: dtype of the written weights ("float32", "bfloat16", "float16"); default param_dtype.
  overwrite: see below.

  Nothing written is lost. Every argument is checked before anything is written. `out_dir` must
  be new, empty, or an earlier glmjax export: exactly the files its glmjax_export.json manifest
  lists, unmodified. Anything else is a ValueError unless overwrite=True, which replaces the
  folder whole, deleting the files glmjax did not write (never a folder that has subfolders). The
  export is written into a sibling folder and renamed into place only once complete, so a
  failure (or an interrupt) leaves `out_dir` exactly as it was and no partial export behind.
  """
  chosen = targets.select(config, target)
  check_params(params, config)
  max_shard_bytes = check_export_arguments(out_dir, target=target, dtype=dtype,
                                           max_shard_size=max_shard_size, overwrite=overwrite,
                                           tokenizer=tokenizer)
  architecture, _ = targets.architecture(chosen, config)
  folder = os.path.realpath(out_dir)
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  staging = sibling(folder, "tmp")
  os.mkdir(staging)
  try:
    if os.path.isdir(folder):
      shutil.copymode(folder, staging)
    files = write_folder(staging, params, config, chosen, tokenizer, dtype, max_shard_bytes)
    with open(os.path.join(staging, MANIFEST_FILE), "w", encoding="utf-8") as f:
      json.dump(manifest(staging, files, chosen.name, architecture), f, indent=2)
    files.append(MANIFEST_FILE)
    swap_in(staging, folder, lambda aside: check_out_dir(out_dir, overwrite, aside))
  finally:
    if os.path.lexists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return ExportResult(chosen.name, architecture, tuple(files))
