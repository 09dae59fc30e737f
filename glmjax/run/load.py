"""A run's params for inference: restored alone, on the devices this host has.

    loaded = load_params("runs/demo")            # newest readable step
    loaded = load_params("runs/demo", step=250, devices=jax.devices()[:1])

generate, eval and export read no optimizer state (a third of Adam's memory
is the params), and lay the params out on a mesh built from the devices
present with the run's logical-axis rules: a run trained on an 8-device
fsdp x tensor mesh loads on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

from glmjax import config_gin
from glmjax.run.directory import UnreadableCheckpoint, Workdir, first_line


def run_experiment(workdir: Workdir, step: int):
  """The Experiment a step was trained with (its operative gin config)."""
  return config_gin.experiment_from_text(workdir.run_info(step)["gin"])


def inference_mesh_config(saved, num_devices: int):
  """The training MeshConfig when its axes fit the devices present, else all devices on `data`
  (params replicated) with the saved logical-axis rules."""
  from glmjax.sharding import MeshConfig, resolve_axis_sizes  # pylint: disable=import-outside-toplevel
  try:
    resolve_axis_sizes(saved, num_devices)
    return saved
  except ValueError:
    return MeshConfig(data=-1, fsdp=1, tensor=1, expert=1, rules=saved.rules)


def restore_params(checkpoints_dir: str, step: int, abstract_params: Any) -> Any:
  """The `params` subtree of a step's `state` item, placed with `abstract_params`' shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  target = {"params": abstract_params}
  path = os.path.join(checkpoints_dir, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # tensorstore / orbax raise many types for a damaged file
    raise UnreadableCheckpoint(f"{path}: {first_line(e)}") from e
  finally:
    checkpointer.close()
  return restored["params"]


@dataclasses.dataclass
class LoadedParams:
  """A step's params on this host's mesh, with what decoding and export need around them."""
  params: Any
  config: Any  # ModelConfig
  experiment: Any  # glmjax.trainer.Experiment (the run's operative gin config)
  mesh: Any
  rules: tuple
  step: int
  workdir: Workdir
  skipped: list = dataclasses.field(default_factory=list)  # "step N: why" for unreadable steps

  @property
  def directory(self) -> str:
    return self.workdir.path

  def sharding_context(self):
    from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
    return shd.activation_sharding(self.mesh, self.rules)

  @property
  def batch_multiple(self) -> int:
    from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
    return shd.batch_divisor(self.mesh, self.rules)


def load_params(path: str, step: Optional[int] = None, *, devices: Optional[Sequence] = None,
                log: Optional[Callable[[str], None]] = None) -> LoadedParams:
  """Params of the newest readable step (or `step`) of a run, sharded over `devices` (default:
  all devices of this host) by the run's logical-axis rules; optimizer state is never read.

  An unreadable newest step is skipped (one `log` line saying which and why) when no `step` is
  asked for; an unreadable asked-for step is a ValueError."""
  import jax  # pylint: disable=import-outside-toplevel

  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from glmjax.model import init_params  # pylint: disable=import-outside-toplevel

  workdir = Workdir(path)
  devices = list(jax.devices() if devices is None else devices)
  skipped = []
  for candidate in workdir.select_step(step):
    try:
      experiment = run_experiment(workdir, candidate)
      mesh_config = inference_mesh_config(experiment.mesh, len(devices))
      mesh = shd.make_mesh(mesh_config, devices)
      rules = shd.normalise_rules(mesh_config.rules)
      if experiment.reward.task:  # a reward model: {"model", "head"} (glmjax.tuning.reward)
        from glmjax.tuning import reward as reward_lib  # pylint: disable=import-outside-toplevel
        params = reward_lib.restore_reward_params(workdir.checkpoints, candidate, experiment, mesh, rules)
      elif experiment.lora.enabled:  # the checkpoint holds adapters only: base read again, merged
        from glmjax.tuning import lora as lora_lib  # pylint: disable=import-outside-toplevel
        params = lora_lib.load_merged(workdir.checkpoints, candidate, experiment, mesh, rules)
      elif experiment.prefix.enabled:  # P-Tuning v2: the base again, the checkpoint's prefix on it
        from glmjax.tuning import prefix as prefix_lib  # pylint: disable=import-outside-toplevel
        params = prefix_lib.restore_prefix_params(workdir.checkpoints, candidate, experiment, mesh, rules)
      else:
        shardings = shd.param_shardings(experiment.model, mesh, rules)
        shapes = jax.eval_shape(functools.partial(init_params, experiment.model), jax.random.PRNGKey(0))
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, shardings)
        params = restore_params(workdir.checkpoints, candidate, abstract)
    except UnreadableCheckpoint as e:
      if step is not None:
        raise ValueError(f"--step {step} of {workdir.path} is unreadable ({e}); pick another step") from e
      skipped.append(f"step {candidate}: {e}")
      if log is not None:
        log(f"skipping unreadable checkpoint step {candidate} ({e})")
      continue
    return LoadedParams(params=params, config=experiment.model, experiment=experiment, mesh=mesh,
                        rules=rules, step=candidate, workdir=workdir, skipped=skipped)
  raise ValueError(f"no readable checkpoint in {workdir.checkpoints} ({'; '.join(skipped)})")
