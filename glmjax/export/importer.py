"""`from_huggingface`: a local HuggingFace folder -> (glmjax params, ModelConfig).

Reads every class `to_huggingface` writes (LLaMA, GLM / GLM-4, Cohere,
GPT-NeoX, GPT-2, BLOOM and the glmjax torch reference model). A folder written
by glmjax carries its ModelConfig's architecture fields in config.json
("glmjax_config"; runtime fields such as attention_impl get their defaults), so
import(export(params)) == params bit for bit; other folders get the
ModelConfig the transformers config describes. Tensors are read lazily from
memory-mapped safetensors, one at a time; a damaged file is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional

import numpy as np

from glmjax.export import safetensors_io, targets
from glmjax.model import ModelConfig, is_spec, param_specs
from glmjax.model.config import RUNTIME_FIELDS, architecture_fields

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not parameters.
IGNORED_TENSORS = (r".*\.attn\.bias$", r".*\.attn\.masked_bias$", r".*rotary_emb\.inv_freq$",
                   r".*attention\.bias$", r".*attention\.masked_bias$")


def read_config_json(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json; pass a folder written by save_pretrained "
                            "or glmjax export")
  return safetensors_io.read_json(path, "config.json")


def target_for(raw: dict) -> targets.Target:
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


def assemble(reader: safetensors_io.SafetensorsReader, config: ModelConfig,
             target: targets.Target) -> dict:
  """Fills every glmjax leaf from the checkpoint tensors; a slot written twice must agree."""
  import jax  # pylint: disable=import-outside-toplevel
  specs = {tuple(k.key for k in path): spec for path, spec in
           jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]}
  arrays = {path: None for path in specs}
  filled = {path: set() for path in specs}
  maps = target.tensors(config)
  used = set()
  for tmap in maps:
    if tmap.name not in reader:
      raise targets.WeightMismatch(f"{reader.directory} has no tensor {tmap.name!r}, which "
                                   f"{target.architecture} with this config needs")
    tensor = reader.get(tmap.name)
    if tuple(tensor.shape) != tuple(tmap.shape):
      raise targets.WeightMismatch(f"{tmap.name} has shape {tuple(tensor.shape)}, the config implies "
                                   f"{tuple(tmap.shape)}")
    used.add(tmap.name)
    for path, value in tmap.from_hf(tensor).items():
      spec = specs[path]
      if arrays[path] is None:
        arrays[path] = np.empty(spec.shape, value.dtype)
      slot = tmap.layer if tmap.layer is not None else ()
      target_slice = arrays[path][slot]
      if np.shape(value) != np.shape(target_slice):
        raise AssertionError(f"{tmap.name} -> {'/'.join(path)}: {np.shape(value)} vs "
                             f"{np.shape(target_slice)}")
      key = tmap.layer if tmap.layer is not None else "all"
      if key in filled[path]:
        if not np.array_equal(arrays[path][slot], value):
          raise targets.WeightMismatch(f"{tmap.name} differs from another tensor that holds "
                                       f"params[{'/'.join(path)}] (the config says they are one "
                                       "parameter)")
        continue
      arrays[path][slot] = value
      filled[path].add(key)
  for path, spec in specs.items():
    expected = {"all"} if spec.axes[:1] != ("layers",) else set(range(config.num_layers))
    if filled[path] != expected:
      raise AssertionError(f"params[{'/'.join(path)}] not fully written by the {target.name} table")
  unexpected = [n for n in reader.names() if n not in used
                and not any(re.fullmatch(p, n) for p in IGNORED_TENSORS)]
  if config.tie_embeddings:
    unexpected = [n for n in unexpected if not _is_tied_copy(reader, n, arrays)]
  if unexpected:
    raise targets.WeightMismatch(f"{reader.directory} has tensors the config does not use: "
                                 f"{unexpected[:8]}")
  return _nest({path: arrays[path].astype(np.dtype(_np_name(config.param_dtype)), copy=False)
                for path in specs})


def _is_tied_copy(reader, name: str, arrays: dict) -> bool:
  """A tied checkpoint may still store the output projection; it must equal the embedding."""
  if not name.endswith(("lm_head.weight", "embed_out.weight")):
    return False
  return np.array_equal(reader.get(name), arrays[("embed", "embedding")])


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
  with safetensors_io.SafetensorsReader(hf_dir) as reader:
    params, config = _read(hf_dir, raw, target, reader, use_stored_config)
  if param_dtype is not None:
    config = dataclasses.replace(config, param_dtype=param_dtype)
    params = _cast(params, param_dtype)
  return params, config


def _read(hf_dir: str, raw: dict, target: targets.Target, reader, use_stored_config: bool):
  """(params, config): under the stored glmjax config when it still describes the folder."""
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
  if config is None:
    config = _with_dtype(native_config(hf_dir, target), raw)
    params = assemble(reader, config, target)
  return params, config


def _with_dtype(config: ModelConfig, raw: dict) -> ModelConfig:
  """Params keep the dtype they are stored in."""
  stored = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  if stored not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.json dtype={stored!r} is not float32, bfloat16 or float16")
  return dataclasses.replace(config, param_dtype=stored)


def _cast(tree: dict, dtype: str) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(_np_name(dtype)) for k, v in tree.items()}


# --- `glmjax import` ----------------------------------------------------------------------------

MODEL_GIN = "model.gin"
IMPORT_EPILOG = """\
Writes OUT/model.gin (the ModelConfig), OUT/checkpoints/0 (the trainer's checkpoint layout: the
imported params, a fresh optimizer state for the experiment's OptimizerConfig, step 0) and
OUT/tokenizer/ (the HuggingFace tokenizer files, when the folder has them). Continue training with
the same experiment files, the model file last:

  glmjax train --gin_file my_finetune.gin --gin_file OUT/model.gin --workdir OUT

Exit codes: 0 imported, 2 bad arguments, unsupported checkpoint or OUT already holding a checkpoint.
"""


def model_gin(config: ModelConfig, source: str) -> str:
  """gin bindings of the model's identity (every ModelConfig field but RUNTIME_FIELDS), in the
  style of experiments/models/*.gin. It is parsed after the experiment's files, so a runtime field
  here would silently override the experiment's attention_impl / dtype / remat_policy."""
  lines = [f"# Imported from {source} by `glmjax import`. Runtime fields ("
           f"{', '.join(sorted(RUNTIME_FIELDS))}) are left to the experiment's gin files.", ""]
  lines += [f"ModelConfig.{name} = {value!r}" for name, value in architecture_fields(config).items()]
  return "\n".join(lines) + "\n"


def write_checkpoint(params: dict, config: ModelConfig, out_dir: str, gin_files=(), bindings=(),
                     source: str = "") -> int:
  """The imported params as step 0 of a `glmjax train` workdir; returns the step written."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import TrainProgram  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from glmjax.trainer.step import new_state  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  gin_path = os.path.join(out_dir, MODEL_GIN)
  with open(gin_path, "w", encoding="utf-8") as f:
    f.write(model_gin(config, source))
  config_gin.clear()
  try:
    config_gin.parse(list(gin_files) + [gin_path], list(bindings))
    experiment = config_gin.build_experiment()
    text = config_gin.operative_config()
  finally:
    config_gin.clear()
  check_same_shapes(experiment.model, config)

  program = TrainProgram(experiment.model, experiment.optimizer, experiment.mesh,
                         num_steps=experiment.trainer.num_steps, global_batch_size=jax.device_count())
  with program.sharding_context():
    placed = jax.device_put(params, program.param_shardings)
    build = jax.jit(lambda p, rng: new_state(p, program.optimizer.init(p), rng),
                    out_shardings=program.state_shardings)
    state = build(placed, jax.random.PRNGKey(experiment.trainer.seed))
  manager = ckpt.make_manager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                              ckpt.CheckpointConfig(async_save=False))
  try:
    if manager.latest_step() is not None:
      raise ValueError(f"{out_dir}/checkpoints already holds step {manager.latest_step()}; import "
                       "into a new folder")
    config_info = {"gin": text, "imported_from": source, "process_count": jax.process_count(),
                   "devices": jax.device_count()}
    ckpt.save(manager, 0, state, {"batches": 0}, config_info, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return 0


def check_same_shapes(model: ModelConfig, imported: ModelConfig) -> None:
  """Bindings may change training fields (dtype, remat, attention_impl), not the param shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  shapes = lambda c: jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), param_specs(c),  # noqa: E731
                                            is_leaf=is_spec)
  if shapes(model) != shapes(imported):
    raise ValueError("the gin files / bindings change the imported ModelConfig's parameter shapes; "
                     "bind only training fields (dtype, remat_policy, attention_impl) of ModelConfig")


def import_parser():
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(
      prog="glmjax import", epilog=IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Import a local HuggingFace checkpoint as a glmjax train workdir (orbax + gin).")
  p.add_argument("--from", dest="source", required=True,
                 help="HuggingFace folder (config.json + safetensors), e.g. from save_pretrained")
  p.add_argument("--out", required=True, help="new glmjax workdir to write")
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16", "stored"),
                 help="dtype of the imported params (default float32 master weights; 'stored': as saved)")
  p.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                 help="experiment file(s) whose Optimizer/Mesh/Trainer configs the state is built for")
  p.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE", help="gin binding")
  return p


def main(argv=None) -> int:
  import sys  # pylint: disable=import-outside-toplevel
  args = import_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  logging.basicConfig(level=logging.WARNING)
  dtype = None if args.param_dtype == "stored" else args.param_dtype
  try:
    params, config = from_huggingface(args.source, param_dtype=dtype)
    write_checkpoint(params, config, args.out, args.gin_file, args.gin, source=args.source)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"glmjax import: {e}", file=sys.stderr)
    return 2
  copied = copy_tokenizer(args.source, os.path.join(args.out, "tokenizer"))
  print(f"glmjax import: {args.source} -> {args.out} (step 0, {MODEL_GIN}"
        + (", tokenizer/" if copied else "") + "); continue with: glmjax train --gin_file <experiment> "
        f"--gin_file {os.path.join(args.out, MODEL_GIN)} --workdir {args.out}")
  return 0


def copy_tokenizer(source: str, out_dir: str) -> bool:
  from glmjax.export.tokenizer_files import HF_TOKENIZER_FILES  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  present = [n for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
  if present:
    os.makedirs(out_dir, exist_ok=True)
    for name in present:
      shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
  return bool(present)
