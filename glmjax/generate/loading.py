"""Loading a trained model for generation and evaluation.

A checkpoint written by `glmjax train` carries its operative gin config; the
model, mesh and optimizer are rebuilt from it and the state is restored with
the trainer's own `glmjax.trainer.checkpoint.restore`, so params come back
sharded over this machine's mesh exactly as the trainer would lay them out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class LoadedModel:
  params: Any
  config: Any  # ModelConfig
  experiment: Any  # glmjax.trainer.Experiment
  program: Any  # glmjax.trainer.TrainProgram (mesh, shardings, sharding context)
  step: int
  directory: str


def checkpoints_dir(path: str) -> str:
  """`path` may be a train workdir (holding checkpoints/) or the checkpoints directory."""
  path = os.path.abspath(path)
  nested = os.path.join(path, "checkpoints")
  if os.path.isdir(nested):
    return nested
  if os.path.isdir(path):
    return path
  raise ValueError(f"--checkpoint {path} does not exist; give a `glmjax train` workdir "
                   "(or its checkpoints/ directory)")


def _experiment_from_gin(text: str):
  import gin  # pylint: disable=import-outside-toplevel
  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  config_gin.register()
  config_gin.clear()
  try:
    gin.parse_config(text)
    return config_gin.build_experiment()
  finally:
    config_gin.clear()


def load_checkpoint(path: str, step: Optional[int] = None) -> LoadedModel:
  """Params (sharded over all local devices) and configs of the latest (or given) step."""
  from glmjax.trainer import TrainProgram  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import checkpoint as ckpt  # pylint: disable=import-outside-toplevel

  directory = checkpoints_dir(path)
  manager = ckpt.make_manager(directory, ckpt.CheckpointConfig(async_save=False))
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint in {directory}; train first (glmjax train --workdir ...)")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"--step {step} is not in {directory} (steps there: {sorted(steps)})")
    info = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if not info.get("gin"):
      raise ValueError(f"checkpoint {directory}/{step} has no operative gin config; it was not "
                       "written by `glmjax train`")
    experiment = _experiment_from_gin(info["gin"])
    # Any batch that divides evenly works: no train step runs here.
    program = TrainProgram(experiment.model, experiment.optimizer, experiment.mesh,
                           num_steps=experiment.trainer.num_steps,
                           global_batch_size=jax.device_count())
    state, _, _ = ckpt.restore(manager, step, program.abstract_state())
  finally:
    manager.close()
  return LoadedModel(params=state["params"], config=experiment.model, experiment=experiment,
                     program=program, step=int(step), directory=directory)
