"""gin glue: the config dataclasses as gin configurables, registered from outside the library.

Library modules never import gin (DESIGN.md section 8). An experiment file
binds dataclass fields by class name:

    include 'experiments/models/llama.gin'
    ModelConfig.num_layers = 4
    OptimizerConfig.learning_rate = 1e-3
    TrainerConfig.num_steps = 300

Unknown names or misspelled fields fail while parsing, before any compile,
with gin's own message (`No configurable matching ...`, `... doesn't have a
parameter named ...`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Sequence

import gin

from glmjax.model import ModelConfig
from glmjax.sharding import DistributedConfig, MeshConfig
from glmjax.trainer import CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig
from glmjax.tuning.dpo import DpoConfig
from glmjax.tuning.lora import LoraConfig
from glmjax.tuning.prefix import PrefixConfig
from glmjax.tuning.reward import RewardConfig

CONFIG_CLASSES = {
    "ModelConfig": ModelConfig,
    "MeshConfig": MeshConfig,
    "OptimizerConfig": OptimizerConfig,
    "DataConfig": DataConfig,
    "TrainerConfig": TrainerConfig,
    "CheckpointConfig": CheckpointConfig,
    "DistributedConfig": DistributedConfig,
    "LoraConfig": LoraConfig,
    "DpoConfig": DpoConfig,
    "PrefixConfig": PrefixConfig,
    "RewardConfig": RewardConfig,
}
_FIELD_OF = {"ModelConfig": "model", "MeshConfig": "mesh", "OptimizerConfig": "optimizer",
             "DataConfig": "data", "TrainerConfig": "trainer", "CheckpointConfig": "checkpoint",
             "DistributedConfig": "distributed", "LoraConfig": "lora",
             "DpoConfig": "dpo", "PrefixConfig": "prefix", "RewardConfig": "reward"}
_configurables: dict = {}


def register() -> dict:
  """Registers every config class once; returns name -> gin-wrapped constructor."""
  if not _configurables:
    for name, cls in CONFIG_CLASSES.items():
      _configurables[name] = gin.external_configurable(cls, name=name, module="glmjax")
  return _configurables


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses experiment files and KEY=VALUE bindings (later ones win). Includes resolve against
  the current directory, the repository root and each file's own directory."""
  register()
  search = [os.getcwd(), repo_root()] + [os.path.dirname(os.path.abspath(f)) for f in gin_files]
  for path in dict.fromkeys(search):
    gin.add_config_file_search_path(path)
  for path in gin_files:
    if not os.path.exists(path) and not any(os.path.exists(os.path.join(d, path)) for d in search):
      raise FileNotFoundError(f"--gin_file {path!r} does not exist (looked in {', '.join(search)})")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize,
                                        skip_unknown=False)
  except SyntaxError as e:  # gin's parser: `TrainerConfig.num_steps =` with no value, a stray quote
    where = f" ({e.filename}, line {e.lineno})" if e.filename else f" (line {e.lineno})"
    raise ValueError(f"gin syntax error{where}: {e.msg}: {(e.text or '').strip()!r}; "
                     "write KEY = VALUE with a Python literal value") from e
  except TypeError as e:  # gin's package-path reader on a namespace-package include path
    raise ValueError(f"cannot resolve a gin include ({e}); give include paths relative to the "
                     "current directory, the repository root or the including file") from e


def build_experiment() -> Experiment:
  """An Experiment from the parsed bindings (unbound fields keep their dataclass defaults); a
  value of the wrong type (`TrainerConfig.num_steps = 'abc'`) is a ValueError naming the field."""
  wrapped = register()
  configs = {}
  for name, ctor in wrapped.items():
    configs[_FIELD_OF[name]] = config = ctor()
    check_field_types(name, config)
  return Experiment(**configs)


def experiment_from_text(text: str) -> Experiment:
  """The Experiment of an operative config text (as saved with each checkpoint), parsed apart
  from whatever this process has bound."""
  register()
  clear()
  try:
    gin.parse_config(text)
    return build_experiment()
  finally:
    clear()


def _accepts(annotation, value) -> bool:
  """Whether `value` fits a (simple) field annotation; unknown annotations accept anything."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_accepts(a, value) for a in args)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if annotation is tuple or origin is tuple:
    return isinstance(value, (tuple, list))
  return True


def check_field_types(class_name: str, config) -> None:
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    annotation = hints.get(field.name)
    if annotation is not None and not _accepts(annotation, value):
      expected = getattr(annotation, "__name__", str(annotation))
      raise ValueError(f"{class_name}.{field.name} = {value!r} must be {expected}; fix the binding "
                       "in the gin file or --gin flag")


def operative_config() -> str:
  return gin.operative_config_str()


def clear() -> None:
  """Forgets all bindings (tests, or parsing a second experiment in one process)."""
  gin.clear_config(clear_constants=True)
