"""orbax checkpoints of the train state, the data position and the operative gin config.

Each step directory holds three items: `state` (params, optimizer state,
step, RNG, non-finite counters: sharded arrays), `data` (the train stream's
position, JSON) and `config` (operative gin config text and run facts, JSON),
plus, for tf.data streams, `data_iterator`: each process's tf.data iterator
state (`process_<i>_of_<n>.*`, tf.train.Checkpoint files). orbax writes all
items into one temporary directory and renames it when complete, so a run
killed mid-save leaves the last complete step as the latest one,
`CheckpointManager.latest_step` never sees the partial one, and an iterator
state is always that of its own step (and deleted with it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

DATA_ITERATOR = "data_iterator"


def iterator_prefix(directory: epath.Path) -> epath.Path:
  """This process's file prefix; keyed by the process count too, since per-process tf.data states
  only fit a run with the same processes (another count resumes by replay)."""
  return directory / f"process_{jax.process_index()}_of_{jax.process_count()}"


class DataIteratorHandler(ocp.CheckpointHandler):
  """orbax item for a tf.data stream's iterator state (`data.TfDataStream`), one file set per process.

  The save is synchronous (orbax runs non-async handlers to completion inside
  `CheckpointManager.save`), so the state is that of the batches consumed at
  the step being saved, before the loop draws the next batch.
  """

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    args.stream.save_iterator(str(iterator_prefix(directory)))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> bool:
    """Restores `args.stream`; False (stream untouched) when there is no state for this process."""
    prefix = iterator_prefix(directory)
    if not epath.Path(str(prefix) + ".index").exists():
      return False
    args.stream.restore_iterator(str(prefix), args.data_state)
    return True

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  stream: Any  # data.TfDataStream


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  stream: Any  # data.TfDataStream
  data_state: dict  # the `data` item of the same step


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save_every: int = 500  # steps; 0 disables periodic saves (the last step is still saved)
  keep: int = 3  # newest checkpoints kept
  async_save: bool = True
  resume: bool = True  # restore the latest checkpoint in the workdir on start
  save_at_end: bool = True


def make_manager(directory: str, config: CheckpointConfig) -> ocp.CheckpointManager:
  if config.save_every < 0 or config.keep < 1:
    raise ValueError(f"CheckpointConfig: save_every={config.save_every} must be >= 0 and "
                     f"keep={config.keep} >= 1")
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.save_every or 10**12, max_to_keep=config.keep,
      enable_async_checkpointing=config.async_save, cleanup_tmp_directories=True, create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), DATA_ITERATOR: DataIteratorHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict, config_info: dict,
         force: bool = False, stream: Any = None) -> bool:
  """Starts a (possibly async) save; returns whether one was started. The device->host copy
  happens before this returns, so the caller may donate `state`'s buffers right after.
  A `stream` with `saves_iterator` also gets its tf.data iterator state saved, before this returns."""
  items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
               config=ocp.args.JsonSave(config_info))
  if getattr(stream, "saves_iterator", False):
    items[DATA_ITERATOR] = DataIteratorSave(stream)
  return manager.save(step, force=force, args=ocp.args.Composite(**items))


def path_name(path) -> str:
  """'params/layers/attn/wq': the same for dict keys, attributes and indices (orbax metadata
  turns NamedTuple fields into dict keys)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shape_table(tree: Any) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(path): tuple(leaf.shape) for path, leaf in flat}


def shape_mismatches(saved: Any, expected: Any) -> list[str]:
  """Human-readable differences between the saved and expected trees (paths and shapes)."""
  saved_shapes, expected_shapes = _shape_table(saved), _shape_table(expected)
  problems = []
  for path in sorted(set(saved_shapes) | set(expected_shapes)):
    if path not in saved_shapes:
      problems.append(f"{path}: missing in the checkpoint (config expects {expected_shapes[path]})")
    elif path not in expected_shapes:
      problems.append(f"{path}: in the checkpoint {saved_shapes[path]} but not in this config")
    elif saved_shapes[path] != expected_shapes[path]:
      problems.append(f"{path}: checkpoint {saved_shapes[path]} != config {expected_shapes[path]}")
  return problems


class CheckpointMismatch(ValueError):
  """The checkpoint's tree or shapes are not this config's: a user error, not a damaged file."""


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: dict) -> None:
  """ValueError listing every mismatched param/state entry before any array is read."""
  saved = manager.item_metadata(step)["state"]
  saved_tree = getattr(saved, "tree", saved)
  problems = shape_mismatches(saved_tree, abstract_state)
  if problems:
    listing = "\n  ".join(problems)
    raise CheckpointMismatch(
        f"checkpoint {manager.directory}/{step} does not match this config's shapes "
        f"({len(problems)} entries):\n  {listing}\n"
        "Use the model/optimizer config it was saved with, or a fresh --workdir.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict, dict]:
  """(state, data_state, config_info) of `step`, arrays placed with `abstract_state`'s shardings."""
  check_compatible(manager, step, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return restored["state"], restored["data"], restored["config"]


def restore_data_stream(manager: ocp.CheckpointManager, step: int, stream: Any, data_state: dict) -> str:
  """Puts `stream` where `step` left it: 'iterator' when the step holds this process's tf.data
  iterator state and the stream can load it, else 'replay' (skip the consumed batches)."""
  has_state = (epath.Path(manager.directory) / str(step) / DATA_ITERATOR).is_dir()
  if has_state and getattr(stream, "saves_iterator", False):
    restored = manager.restore(step, args=ocp.args.Composite(
        **{DATA_ITERATOR: DataIteratorRestore(stream, data_state)}))
    if restored[DATA_ITERATOR]:
      return "iterator"
  stream.restore(data_state)
  return "replay"


