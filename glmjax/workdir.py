"""The run directory: one object for what `glmjax train` / `glmjax import` write and every command reads.

    runs/demo/
      config.gin      operative gin config of the last (re)start, written once its checkpoint
                      restored (or the fresh state was built): a refused run leaves it untouched
      model.gin       the ModelConfig of an imported checkpoint (`glmjax import`)
      checkpoints/N/  orbax steps (glmjax.trainer.checkpoint): state, data, config, data_iterator
      skipped_checkpoints/N/  steps set aside, never deleted: unreadable ones, or newer ones than
                      the `--step` a run resumed from
      tokenizer/      tokenizer files that came with an import
      metrics.jsonl, tensorboard/, loss.png, summary.json

Inference-side commands (generate, eval, export) restore the params alone
(`load_params`): no optimizer state is read, and the mesh is built from the
devices present, so a run trained on an 8-device fsdp x tensor mesh loads on
one device. Every file here is written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

CONFIG_GIN = "config.gin"
MODEL_GIN = "model.gin"
CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_checkpoints"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class UnreadableCheckpoint(RuntimeError):
  """A step directory exists but cannot be read back (truncated or corrupt files)."""


# --- writes ---------------------------------------------------------------------------------

def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and a rename, so a
  reader (or a crash) sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def check_folder_argument(path: str, flag: str) -> str:
  """A folder the command may create: ValueError (one line) when it names an existing file."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag} {path} is a file; give a folder (it is created if missing)")
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
  return path


# --- reading -------------------------------------------------------------------------------

def step_directories(checkpoints_dir: str) -> list[int]:
  """Steps orbax finished writing (a partial save is a `N.orbax-checkpoint-tmp-*` folder)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoints_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, n)))


class Workdir:
  """A `glmjax train` / `glmjax import` run directory (or, for reading, its checkpoints/)."""

  def __init__(self, path: str):
    path = os.path.abspath(path)
    if os.path.basename(path) == CHECKPOINTS and not os.path.isdir(os.path.join(path, CHECKPOINTS)):
      path = os.path.dirname(path)
    self.path = path

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def checkpoints(self) -> str:
    return self.file(CHECKPOINTS)

  def steps(self) -> list[int]:
    return step_directories(self.checkpoints)

  def require_steps(self, flag: str = "--checkpoint") -> list[int]:
    """The steps, or ValueError (one line) naming what is missing."""
    if not os.path.exists(self.path):
      raise ValueError(f"{flag} {self.path} does not exist; give a `glmjax train` workdir")
    if not os.path.isdir(self.path):
      raise ValueError(f"{flag} {self.path} is a file; give a `glmjax train` workdir")
    steps = self.steps()
    if not steps:
      raise ValueError(f"{flag} {self.path} holds no checkpoint ({CHECKPOINTS}/N); train first "
                       "(glmjax train --workdir ...) or import one (glmjax import --out ...)")
    return steps

  def select_step(self, step: Optional[int], flag: str = "--step") -> list[int]:
    """Candidate steps, newest first: just `step` when given, else every complete step."""
    steps = self.require_steps()
    if step is None:
      return sorted(steps, reverse=True)
    if step not in steps:
      raise ValueError(f"{flag} {step} is not a checkpoint of {self.path} (steps there: {steps})")
    return [step]

  def run_info(self, step: int) -> dict:
    """The `config` item of a step: {"gin": operative config, ...} (orbax JSON item 'metadata')."""
    path = os.path.join(self.checkpoints, str(step), "config", "metadata")
    try:
      with open(path, encoding="utf-8") as f:
        info = json.load(f)
    except (OSError, ValueError) as e:
      raise UnreadableCheckpoint(f"{path}: {type(e).__name__}: {e}") from e
    if not isinstance(info, dict) or not info.get("gin"):
      raise UnreadableCheckpoint(f"{path} has no operative gin config (not written by glmjax)")
    return info

  def experiment(self, step: int):
    """The Experiment a step was trained with (its operative gin config)."""
    from glmjax import config_gin  # pylint: disable=import-outside-toplevel
    return config_gin.experiment_from_text(self.run_info(step)["gin"])

  def set_aside(self, step: int, reason: str) -> str:
    """Moves a step out of checkpoints/ (never deletes it); returns where it went."""
    os.makedirs(self.file(SKIPPED), exist_ok=True)
    target = os.path.join(self.file(SKIPPED), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(os.path.join(self.checkpoints, str(step)), target)
    atomic_write_text(os.path.join(target, "WHY.txt"), reason + "\n")
    return target

  def truncate_metrics(self, last_step: int) -> None:
    """Drops metrics.jsonl records past `last_step` (steps a killed run logged after its last
    checkpoint are replayed on resume and logged again)."""
    path = self.file(METRICS)
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      if int(record.get("step", 0)) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
      atomic_write_text(path, "".join(kept))


# --- params-only restore -------------------------------------------------------------------

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
    raise UnreadableCheckpoint(f"{path}: {_first_line(e)}") from e
  finally:
    checkpointer.close()
  return restored["params"]


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


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
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from glmjax.model import init_params  # pylint: disable=import-outside-toplevel

  workdir = Workdir(path)
  devices = list(jax.devices() if devices is None else devices)
  skipped = []
  for candidate in workdir.select_step(step):
    try:
      experiment = workdir.experiment(candidate)
      mesh_config = inference_mesh_config(experiment.mesh, len(devices))
      mesh = shd.make_mesh(mesh_config, devices)
      rules = shd.normalise_rules(mesh_config.rules)
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


def copy_tree_atomic(source: str, target: str) -> None:
  """Copies a folder to `target` (which must not exist) through a temporary sibling."""
  tmp = f"{target}.tmp-{os.getpid()}"
  shutil.copytree(source, tmp)
  os.replace(tmp, target)


# --- the run `glmjax import` writes --------------------------------------------------------

def check_new_run_folder(path: str, flag: str = "--out") -> str:
  """A folder for a new run: absent or empty (an import never writes over anything)."""
  path = check_folder_argument(path, flag)
  if os.path.isdir(path) and os.listdir(path):
    held = "a checkpoint" if step_directories(os.path.join(path, CHECKPOINTS)) else "files"
    raise ValueError(f"{flag} {path} already holds {held}; import into a new or empty folder")
  return path


def check_same_shapes(model, imported) -> None:
  """Bindings may change how the model runs (dtype, remat, attention_impl), not its params."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax.model import is_spec, param_specs  # pylint: disable=import-outside-toplevel
  shapes = lambda c: jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), param_specs(c),  # noqa: E731
                                            is_leaf=is_spec)
  if shapes(model) != shapes(imported):
    raise ValueError("the gin files / bindings change the imported ModelConfig's parameter shapes; "
                     "bind only runtime fields of ModelConfig (dtype, remat_policy, attention_impl)")


def write_imported_run(params: dict, config, out_dir: str, model_gin_text: str, *,
                       gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                       tokenizer_files: Sequence[str] = (), source: str = "") -> str:
  """A new run directory holding `params` as step 0 (params + a fresh optimizer state for the
  experiment's OptimizerConfig), model.gin and tokenizer/. Built in a temporary sibling folder and
  renamed into place, so a failure leaves nothing behind and never touches an existing folder."""
  import jax  # pylint: disable=import-outside-toplevel

  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import TrainProgram  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from glmjax.trainer.step import new_state  # pylint: disable=import-outside-toplevel

  out_dir = check_new_run_folder(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    raise ValueError(f"{tmp} exists (left by an earlier import?); remove it or import elsewhere")
  os.makedirs(tmp)
  try:
    gin_path = os.path.join(tmp, MODEL_GIN)
    atomic_write_text(gin_path, model_gin_text)
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
    manager = ckpt.make_manager(os.path.join(tmp, CHECKPOINTS), ckpt.CheckpointConfig(async_save=False))
    try:
      info = {"gin": text, "imported_from": source, "process_count": jax.process_count(),
              "devices": jax.device_count()}
      ckpt.save(manager, 0, state, {"batches": 0}, info, force=True)
      manager.wait_until_finished()
    finally:
      manager.close()
    if tokenizer_files:
      os.makedirs(os.path.join(tmp, TOKENIZER))
      for path in tokenizer_files:
        shutil.copyfile(path, os.path.join(tmp, TOKENIZER, os.path.basename(path)))
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
