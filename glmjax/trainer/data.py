"""Host batches for the trainer: seqio tasks (or any iterable of batch dicts) with a resumable position.

Data layout is fixed by `DataConfig.num_shards` S, not by the number of
processes P: the global batch of B rows is the concatenation, in shard order,
of B/S rows from each of S seqio shards (`seqio.ShardInfo(s, S)`), and process
p reads shards [p*S/P, (p+1)*S/P). So a 2-process run and a 1-process run with
the same S see the same global batches, and a run may resume on a different
number of hosts.

Resume is exact either way:
- tf.data streams (`from_tf_dataset`, the seqio train stream) also checkpoint
  the tf.data iterator itself (`save_iterator` / `restore_iterator`, tf.data
  iterator checkpointing through `glmjax.tasks.pipeline.DatasetIterator`), so a
  resume rebuilds the pipeline and reloads its state (well under a second)
  instead of replaying it.
- Otherwise (plain Python iterables, checkpoints without iterator state, a
  different process count) the checkpoint's count of consumed batches is
  replayed: the (deterministic, seeded) pipeline is rebuilt and that many
  batches are skipped (`tf.data.Dataset.skip` inside the graph for tf.data,
  before any Python conversion), which grows with the step count.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional

from glmjax.model.batch import to_host_batch
from glmjax.model.config import LAYOUT_FLAGS, ModelConfig, layout_from_flags


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture: str = "glmjax_blank_infilling_default"  # seqio task or mixture name
  sequence_length: int = 128
  batch_size: int = 8  # global rows per step
  pack: bool = True
  shuffle: bool = True
  seed: int = 0
  train_split: str = "train"
  num_shards: int = 0  # 0: one shard per process
  eval_mixture: Optional[str] = None  # None: `mixture`
  eval_split: str = "validation"
  eval_batches: int = 4
  modules: tuple = ()  # Python modules to import first (they register user tasks)
  # Prompt layout of GLM-format tasks (glmjax.tasks.GLMFeatureConverter) comes from the model:
  # ModelConfig.prompt_layout. None (the default) takes it from there; an explicit value must
  # agree with it (`resolve_prompt_layout`): bidirectional_inputs is False for "causal" only,
  # positions_1d (block positions 0) is True for "glm130b" and "causal".
  bidirectional_inputs: Optional[bool] = None
  positions_1d: Optional[bool] = None


def resolve_prompt_layout(config: DataConfig, model: Optional[ModelConfig] = None) -> str:
  """The prompt layout GLM-format batches are built with: the model's `prompt_layout`
  (ModelConfig's default without a model), checked against explicit DataConfig flags.
  Without a model, explicit flags choose the layout (`layout_from_flags`)."""
  if model is None:
    if config.bidirectional_inputs is None and config.positions_1d is None:
      return ModelConfig.prompt_layout
    bidirectional = config.bidirectional_inputs is not False
    return layout_from_flags(bidirectional,
                             config.positions_1d if config.positions_1d is not None else not bidirectional)
  layout = model.prompt_layout
  for field, implied in zip(("bidirectional_inputs", "positions_1d"), LAYOUT_FLAGS[layout]):
    value = getattr(config, field)
    if value is not None and bool(value) != implied:
      raise ValueError(f"DataConfig.{field}={value} conflicts with ModelConfig.prompt_layout={layout!r} "
                       f"(which implies {field}={implied}); drop DataConfig.{field} or change the model's "
                       "prompt_layout")
  return layout


def resolve_num_shards(config: DataConfig, process_count: int) -> int:
  shards = config.num_shards or process_count
  if shards % process_count:
    raise ValueError(f"DataConfig.num_shards={shards} must be a multiple of the {process_count} "
                     "processes (each process reads the same number of shards)")
  if config.batch_size % shards:
    raise ValueError(f"DataConfig.batch_size={config.batch_size} must be a multiple of the "
                     f"{shards} data shards (DataConfig.num_shards)")
  return shards


class ResumableStream:
  """Iterator of host batches whose position (batches consumed) is its checkpointable state.

  `open_at(n)` returns an iterator that starts after the first n batches;
  rebuilding it from the same deterministic source makes resume exact.
  """

  def __init__(self, open_at: Callable[[int], Iterator[dict]], position: int = 0,
               layout: Optional[dict] = None):
    self._open_at = open_at
    self.position = position
    self.layout = dict(layout or {})
    self._it = open_at(position)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = to_host_batch(next(self._it))
    self.position += 1
    return batch

  saves_iterator = False  # True where `save_iterator` / `restore_iterator` exist (tf.data)

  def state(self) -> dict:
    return {"batches": self.position, **self.layout}

  def check_layout(self, state: dict) -> None:
    for key, value in self.layout.items():
      if key in state and state[key] != value:
        raise ValueError(f"checkpointed data layout {key}={state[key]!r} differs from this run's "
                         f"{value!r}; resume with the same DataConfig (num_shards, batch_size, mixture)")

  def restore(self, state: dict) -> None:
    """Resume by replay: reopen the source after the checkpoint's consumed batches."""
    self.check_layout(state)
    self.position = int(state["batches"])
    self._it = self._open_at(self.position)


class TfDataStream(ResumableStream):
  """A tf.data stream whose iterator state can be checkpointed, so resume needs no replay.

  tf.data restores an iterator only into an identically built pipeline, so the
  state records `opened_at`, the `skip` the current iterator was built with
  (nonzero after a replay resume), and `restore_iterator` rebuilds that graph.
  """

  saves_iterator = True

  def __init__(self, make_dataset: Callable[[], Any], layout: Optional[dict] = None):
    self._make_dataset = make_dataset
    self.opened_at = 0
    super().__init__(self._open, layout=layout)

  def _open(self, skip: int):
    from glmjax.tasks.pipeline import DatasetIterator  # pylint: disable=import-outside-toplevel
    self.opened_at = skip
    ds = self._make_dataset()
    return DatasetIterator(ds.skip(skip) if skip else ds)

  def state(self) -> dict:
    return {**super().state(), "opened_at": self.opened_at}

  def save_iterator(self, prefix: str) -> None:
    """Writes the tf.data iterator state (tf.train.Checkpoint files `prefix.*`)."""
    self._it.save(prefix)

  def restore_iterator(self, prefix: str, state: dict) -> None:
    """Continues from `save_iterator`'s files; `state` is the `state()` saved with them."""
    self.check_layout(state)
    it = self._open(int(state.get("opened_at", 0)))
    it.restore(prefix)
    self._it = it
    self.position = int(state["batches"])


def from_iterable(make_iterable: Callable[[], Iterable[dict]], layout: Optional[dict] = None) -> ResumableStream:
  """Any deterministic iterable of batch dicts; resume replays it and drops the consumed batches."""
  return ResumableStream(lambda skip: itertools.islice(iter(make_iterable()), skip, None), layout=layout)


def from_tf_dataset(make_dataset: Callable[[], Any], layout: Optional[dict] = None) -> ResumableStream:
  """A (deterministic) tf.data.Dataset of batches; resume restores the checkpointed iterator state,
  or skips inside the tf.data graph where there is none."""
  return TfDataStream(make_dataset, layout=layout)


# --- seqio ----------------------------------------------------------------------------------
# The tf.data pipeline itself is glmjax.tasks' (seqio_batches); here it is split into
# per-process shards and wrapped as resumable streams.

def _import_tasks(config: DataConfig):
  """glmjax.tasks (registers the shipped tasks; imports TensorFlow) plus DataConfig.modules."""
  import glmjax.tasks as tasks  # pylint: disable=import-outside-toplevel
  tasks.import_task_modules(config.modules)
  return tasks


def _shard_datasets(config: DataConfig, name: str, split: str, *, shuffle: bool,
                    num_epochs: Optional[int], process_index: int, process_count: int,
                    model: Optional[ModelConfig]) -> Callable:
  """() -> tf.data.Dataset of this process's rows: its shards' batches zipped and concatenated."""
  layout = resolve_prompt_layout(config, model)
  tasks = _import_tasks(config)
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  shards = resolve_num_shards(config, process_count)
  per_process = shards // process_count
  rows = config.batch_size // shards
  mine = range(process_index * per_process, (process_index + 1) * per_process)

  def shard(s: int):
    return tasks.seqio_batches(name, sequence_length=config.sequence_length, batch_size=rows, split=split,
                               shuffle=shuffle, seed=config.seed, pack=config.pack, num_epochs=num_epochs,
                               shard_info=seqio.ShardInfo(index=s, num_shards=shards) if shards > 1 else None,
                               prompt_layout=layout)

  def make():
    parts = [shard(s) for s in mine]
    if len(parts) == 1:
      return parts[0]
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *bs: {k: tf.concat([b[k] for b in bs], axis=0) for k in bs[0]})
  return make


def train_stream(config: DataConfig, process_index: int = 0, process_count: int = 1, *,
                 model: Optional[ModelConfig] = None) -> ResumableStream:
  """The training stream; GLM-format tasks are laid out by `model.prompt_layout`."""
  make = _shard_datasets(config, config.mixture, config.train_split, shuffle=config.shuffle,
                         num_epochs=None, process_index=process_index, process_count=process_count,
                         model=model)
  layout = {"mixture": config.mixture, "num_shards": resolve_num_shards(config, process_count),
            "batch_size": config.batch_size, "sequence_length": config.sequence_length,
            "seed": config.seed}
  return from_tf_dataset(make, layout=layout)


def eval_batches(config: DataConfig, process_index: int = 0, process_count: int = 1, *,
                 model: Optional[ModelConfig] = None) -> list:
  """The first `eval_batches` batches of the validation split (fixed, unshuffled); all of it when 0."""
  name = config.eval_mixture or config.mixture
  make = _shard_datasets(config, name, config.eval_split, shuffle=False, num_epochs=1,
                         process_index=process_index, process_count=process_count, model=model)
  ds = make()
  if config.eval_batches:
    ds = ds.take(config.eval_batches)
  batches = [to_host_batch(b) for b in ds.as_numpy_iterator()]
  if not batches:
    raise ValueError(f"{name!r} split {config.eval_split!r} gives no full batch of "
                     f"{config.batch_size} rows x {config.sequence_length}; lower DataConfig.batch_size "
                     "or set TrainerConfig.eval_every=0")
  return batches
