"""The train loop: data -> sharded step -> metrics / eval / checkpoints, resumable and preemptible.

    result = train(Experiment(model=..., data=DataConfig(...)), workdir="runs/demo")

Per step, in order: next host batch (this process's rows) -> global arrays ->
jitted step (donated state) -> metrics fetched (loss, accuracy, grad norm,
learning rate, tokens/s, MFU) -> maybe eval, checkpoint, stop. The data
position saved with a checkpoint is exactly the number of batches the saved
state has consumed, so a resumed run continues with the next batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Iterable, Optional

import jax
import numpy as np

from glmjax.model import ModelConfig
from glmjax.sharding import DistributedConfig, MeshConfig
from glmjax.sharding import distributed as dist
from glmjax.trainer import checkpoint as ckpt
from glmjax.trainer import data as data_lib
from glmjax.trainer import metrics as metrics_lib
from glmjax.trainer.data import DataConfig
from glmjax.trainer.optim import OptimizerConfig
from glmjax.trainer.step import StepConfig, TrainProgram

log = logging.getLogger("glmjax.train")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  num_steps: int = 1000
  seed: int = 0  # parameter init
  microbatches: int = 1  # gradient accumulation steps per update
  z_loss: float = 0.0  # PaLM uses 1e-4
  log_every: int = 1  # metrics.jsonl / TensorBoard records
  eval_every: int = 0  # steps; 0: evaluate only at the end when eval data exists
  eval_at_end: bool = True
  max_nonfinite_streak: int = 10  # consecutive skipped (non-finite) updates before stopping
  progress_bar: bool = True
  peak_flops_per_device: float = 0.0  # MFU denominator; 0: table by device kind / measured on CPU
  plot: bool = True  # loss-curve PNG in the workdir at the end


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  trainer: TrainerConfig = TrainerConfig()
  checkpoint: ckpt.CheckpointConfig = ckpt.CheckpointConfig()
  distributed: DistributedConfig = DistributedConfig()


@dataclasses.dataclass
class TrainResult:
  status: str  # "completed" | "preempted"
  step: int
  records: list
  state: Any
  workdir: Optional[str]
  resumed_from: Optional[int] = None
  data_resumed_by: Optional[str] = None  # "iterator" (tf.data state) | "replay" (skip consumed batches)


class NonFiniteLossError(RuntimeError):
  pass


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """Every process stops at the same step: any process's SIGTERM stops them all."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))


def _as_stream(source, layout: dict) -> data_lib.ResumableStream:
  if isinstance(source, data_lib.ResumableStream):
    return source
  if callable(source):
    return data_lib.from_iterable(source, layout=layout)
  raise TypeError("train_data must be a ResumableStream or a zero-argument callable returning an "
                  "iterable of batch dicts (called again, from the start, on resume)")


def _host_rows(batch: dict, process_index: int, process_count: int) -> dict:
  """Rows of a global host batch that belong to this process (for user iterables that yield
  global batches)."""
  if process_count == 1:
    return batch
  rows = len(next(iter(batch.values())))
  per = rows // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


def _validate(experiment: Experiment) -> None:
  t, d, m = experiment.trainer, experiment.data, experiment.model
  if t.num_steps < 1:
    raise ValueError(f"TrainerConfig.num_steps={t.num_steps} must be >= 1")
  if d.sequence_length > m.max_length:
    raise ValueError(f"DataConfig.sequence_length={d.sequence_length} exceeds ModelConfig.max_length="
                     f"{m.max_length}; shorten the sequences or raise max_length")
  if t.max_nonfinite_streak < 1:
    raise ValueError("TrainerConfig.max_nonfinite_streak must be >= 1")


def check_batch_ids(batch: dict, model: ModelConfig) -> None:
  """Ids the model would gather out of range fail here, on the host: the jitted
  embedding gather would silently clamp token ids and turn position ids past a
  learned table into NaN."""
  ranges = [("tokens", model.vocab_size, "ModelConfig.vocab_size",
             "set vocab_size to the data's vocabulary size (8192 for glmjax.tasks' default)"),
            ("targets", model.vocab_size, "ModelConfig.vocab_size",
             "set vocab_size to the data's vocabulary size (8192 for glmjax.tasks' default)")]
  if model.uses_learned_positions:
    fix = ("raise ModelConfig.max_length above DataConfig.sequence_length (GLM block positions "
           "reach the span length + 1) or shorten the sequences")
    ranges.append(("positions", model.max_length, "ModelConfig.max_length", fix))
    if model.position == "learned_2d":
      ranges.append(("block_positions", model.max_length, "ModelConfig.max_length", fix))
  for key, limit, field, fix in ranges:
    if key not in batch:
      continue
    low, high = int(batch[key].min()), int(batch[key].max())
    if low < 0 or high >= limit:
      raise ValueError(f"batch[{key!r}] has ids in [{low}, {high}] but {field}={limit}; {fix}")


def _progress(enabled: bool, total: int, initial: int):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5)


def _eval(program: TrainProgram, params, batches: list) -> dict:
  totals = None
  for host in batches:
    sums = jax.device_get(program.eval_sums(params, program.global_batch(host)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  weight = max(float(totals["weight_sum"]), 1.0)
  return {"eval_loss": float(totals["nll_sum"]) / weight,
          "eval_accuracy": float(totals["correct_sum"]) / weight, "eval_tokens": float(totals["weight_sum"])}


def train(experiment: Experiment, workdir: Optional[str] = None, *, train_data=None,
          eval_data: Optional[Iterable[dict]] = None, config_text: str = "",
          devices: Optional[list] = None) -> TrainResult:
  """Trains `experiment`; resumes from the latest checkpoint in `workdir/checkpoints` if any.

  train_data: None (the seqio mixture of `experiment.data`), a `ResumableStream`, or a
  zero-argument callable returning an iterable of batch dicts (global batches; each process
  keeps its rows). eval_data: a list of batch dicts, or None (the validation split when
  `eval_every` is set). devices: the mesh's devices (default: all of them).
  """
  dist.initialize(experiment.distributed)
  _validate(experiment)
  cfg = experiment.trainer
  pid, nproc = jax.process_index(), jax.process_count()
  is_main = pid == 0

  program = TrainProgram(experiment.model, experiment.optimizer, experiment.mesh,
                         num_steps=cfg.num_steps, global_batch_size=experiment.data.batch_size,
                         step_config=StepConfig(microbatches=cfg.microbatches, z_loss=cfg.z_loss),
                         devices=devices)
  layout = {"batch_size": experiment.data.batch_size, "sequence_length": experiment.data.sequence_length}
  if train_data is None:
    stream = data_lib.train_stream(experiment.data, pid, nproc)
    host_rows = lambda b: b  # noqa: E731
  else:
    stream = _as_stream(train_data, layout)
    host_rows = lambda b: _host_rows(b, pid, nproc)  # noqa: E731
  wants_eval = cfg.eval_every > 0 or (cfg.eval_at_end and (eval_data is not None or train_data is None))
  if eval_data is not None:
    eval_host = [data_lib.to_host_batch(_host_rows(b, pid, nproc)) for b in eval_data]
  elif wants_eval and train_data is None:
    eval_host = data_lib.eval_batches(experiment.data, pid, nproc)
  else:
    eval_host = []

  if workdir is not None and is_main:
    os.makedirs(workdir, exist_ok=True)
    if config_text:
      with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(config_text)
  manager = None
  if workdir is not None:
    manager = ckpt.make_manager(os.path.abspath(os.path.join(workdir, "checkpoints")), experiment.checkpoint)

  resumed_from = resumed_by = None
  latest = manager.latest_step() if manager is not None and experiment.checkpoint.resume else None
  if latest is not None:
    state, data_state, _ = ckpt.restore(manager, latest, program.abstract_state())
    resumed_by = ckpt.restore_data_stream(manager, latest, stream, data_state)
    resumed_from = latest
    if is_main:
      log.info("resumed from %s at step %d (data: %s)", manager.directory, latest, resumed_by)
  else:
    state = program.init_state(cfg.seed)
  step = int(jax.device_get(state["step"]))

  run_log = metrics_lib.RunLog(workdir, enabled=is_main)
  seq_len = experiment.data.sequence_length
  tokens_per_step = experiment.data.batch_size * seq_len
  flops_per_step = metrics_lib.flops_per_token(experiment.model, seq_len) * tokens_per_step
  peak = metrics_lib.peak_flops(list(program.mesh.devices.flat), cfg.peak_flops_per_device)
  config_info = {"gin": config_text, "process_count": nproc, "devices": jax.device_count(),
                 "mesh": {k: int(v) for k, v in program.mesh.shape.items()}}
  bar = _progress(cfg.progress_bar and is_main, cfg.num_steps, step)
  status = "completed"

  def checkpoint(force: bool) -> None:
    if manager is None:
      return
    if force and step in manager.all_steps():
      return
    ckpt.save(manager, step, state, stream.state(), config_info, force=force, stream=stream)

  def evaluate() -> None:
    if eval_host:
      record = {"kind": "eval", **_eval(program, state["params"], eval_host)}
      run_log.write(step, record)
      if bar is not None:
        bar.write(f"step {step}: eval loss {record['eval_loss']:.4f} accuracy {record['eval_accuracy']:.3f}")

  try:
    with _Preemption() as preemption:
      last_time = time.perf_counter()
      first_step_of_run = True
      while step < cfg.num_steps:
        try:
          host = next(stream)
        except StopIteration:
          raise ValueError(f"the training data ran out after {stream.position} batches, before "
                           f"TrainerConfig.num_steps={cfg.num_steps}") from None
        host = host_rows(host)
        check_batch_ids(host, experiment.model)
        batch = program.global_batch(host)
        state, device_metrics = program.train_step(state, batch)
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        step += 1
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        m.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                 mfu=flops_per_step / dt / peak if peak else 0.0)
        if first_step_of_run:
          m["includes_compile"] = 1.0
          first_step_of_run = False
        if step % cfg.log_every == 0 or step == cfg.num_steps:
          run_log.write(step, {"kind": "train", **m})
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
          bar.update(1)
        if m["nonfinite_streak"] >= cfg.max_nonfinite_streak:
          raise NonFiniteLossError(
              f"loss or gradients were non-finite for {int(m['nonfinite_streak'])} steps in a row "
              f"(up to step {step}); those updates were skipped. Stopping "
              f"(TrainerConfig.max_nonfinite_streak={cfg.max_nonfinite_streak}). Lower "
              "OptimizerConfig.learning_rate, add warmup or TrainerConfig.z_loss, or check the data; "
              "the last checkpoint holds the last good state.")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
          evaluate()
        if manager is not None and manager.should_save(step):
          checkpoint(force=False)
        if preemption.agreed():
          status = "preempted"
          checkpoint(force=True)
          if bar is not None:
            bar.write(f"SIGTERM: saved a checkpoint at step {step}; exiting")
          break
    if status == "completed":
      if cfg.eval_at_end:
        evaluate()
      if experiment.checkpoint.save_at_end:
        checkpoint(force=True)
  finally:
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    run_log.close()

  if is_main and workdir is not None and cfg.plot:
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    metrics_lib.plot_loss_curve(records, os.path.join(workdir, "loss.png"),
                                title=f"{os.path.basename(os.path.abspath(workdir))}")
  if is_main and workdir is not None:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump({"status": status, "step": step, "resumed_from": resumed_from,
                 "last": run_log.records[-1] if run_log.records else None}, f, indent=1)
  return TrainResult(status=status, step=step, records=run_log.records, state=state, workdir=workdir,
                     resumed_from=resumed_from, data_resumed_by=resumed_by)
