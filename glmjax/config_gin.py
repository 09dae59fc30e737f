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

import os
from typing import Sequence

import gin

from glmjax.model import ModelConfig
from glmjax.sharding import DistributedConfig, MeshConfig
from glmjax.trainer import CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig

CONFIG_CLASSES = {
    "ModelConfig": ModelConfig,
    "MeshConfig": MeshConfig,
    "OptimizerConfig": OptimizerConfig,
    "DataConfig": DataConfig,
    "TrainerConfig": TrainerConfig,
    "CheckpointConfig": CheckpointConfig,
    "DistributedConfig": DistributedConfig,
}
_FIELD_OF = {"ModelConfig": "model", "MeshConfig": "mesh", "OptimizerConfig": "optimizer",
             "DataConfig": "data", "TrainerConfig": "trainer", "CheckpointConfig": "checkpoint",
             "DistributedConfig": "distributed"}
_configurables: dict = {}


def register() -> dict:
  """Registers every config class once; returns name -> gin-wrapped constructor."""
  if not _configurables:
    for name, cls in CONFIG_CLASSES.items():
      _configurables[name] = gin.external_configurable(cls, name=name, module="glmjax")
  return _configurables


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _guard_package_path_reader() -> None:
  """gin's package-path reader crashes (TypeError) when a path's head is a namespace package,
  e.g. `include 'experiments/...'` with the repository on sys.path but another working
  directory; treat that as "not found there" so the next search path is tried."""
  from gin import config as gin_config  # pylint: disable=import-outside-toplevel
  readers = getattr(gin_config, "_FILE_READERS", None)
  if not isinstance(readers, list):
    return
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "__module__", "") == "gin.resource_reader":
      def safe_exists(path, _exists=exists):
        try:
          return _exists(path)
        except TypeError:
          return False
      safe_exists.__module__ = __name__
      readers[i] = (reader, safe_exists)


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses experiment files and KEY=VALUE bindings (later ones win). Includes resolve against
  the current directory, the repository root and each file's own directory."""
  register()
  _guard_package_path_reader()
  search = [os.getcwd(), repo_root()] + [os.path.dirname(os.path.abspath(f)) for f in gin_files]
  for path in dict.fromkeys(search):
    gin.add_config_file_search_path(path)
  for path in gin_files:
    if not os.path.exists(path) and not any(os.path.exists(os.path.join(d, path)) for d in search):
      raise FileNotFoundError(f"--gin_file {path!r} does not exist (looked in {', '.join(search)})")
  gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize,
                                      skip_unknown=False)


def build_experiment() -> Experiment:
  """An Experiment from the parsed bindings (unbound fields keep their dataclass defaults)."""
  wrapped = register()
  return Experiment(**{_FIELD_OF[name]: ctor() for name, ctor in wrapped.items()})


def operative_config() -> str:
  return gin.operative_config_str()


def config_text() -> str:
  """Every binding in effect (the full config, not only what was used)."""
  return gin.config_str()


def clear() -> None:
  """Forgets all bindings (tests, or parsing a second experiment in one process)."""
  gin.clear_config(clear_constants=True)
