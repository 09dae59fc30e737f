"""The train loop: data -> sharded step -> metrics / eval / checkpoints, resumable and preemptible.

    result = train(Experiment(model=..., data=DataConfig(...)), workdir="runs/demo")

Per step, in order: next host batch (this process's rows) -> global arrays ->
jitted step (donated state) -> metrics fetched (loss, accuracy, grad norm,
learning rate, tokens/s, MFU) -> maybe eval, checkpoint, stop. The data
position saved with a checkpoint is exactly the number of batches the saved
state has consumed, so a resumed run continues with the next batch.

With TrainerConfig.steps_per_call = n > 1 (the "auto" default for runs of >= 64 steps on one
CPU device) the steps go n to a call (TrainProgram.train_steps, the same updates bit for bit):
calls end at every checkpoint / eval step and at the end, so those happen at the same steps as
with n = 1; a stop signal takes effect at the end of the call (n steps at most); each step's
logged time is the call's over n.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np

from glmjax.run import directory as workdir_lib
from glmjax.model import ModelConfig
from glmjax.model import batch as batch_lib
from glmjax.sharding import DistributedConfig, MeshConfig
from glmjax.sharding import distributed as dist
from glmjax.trainer import checkpoint as ckpt
from glmjax.trainer import data as data_lib
from glmjax.trainer import metrics as metrics_lib
from glmjax.trainer.data import DataConfig
from glmjax.trainer.optim import OptimizerConfig
from glmjax.trainer import step as step_lib
from glmjax.trainer.step import StepConfig, TrainProgram
from glmjax.tuning import dpo as dpo_lib
from glmjax.tuning import lora as lora_lib
from glmjax.tuning import prefix as prefix_lib
from glmjax.tuning import reward as reward_lib

log_ = logging.getLogger("glmjax.train")


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
  # updates per jitted call (glmjax.trainer.step.resolve_steps_per_call): "auto" = 4 on one CPU
  # device for runs of >= 64 steps, else 1
  steps_per_call: Any = "auto"


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  trainer: TrainerConfig = TrainerConfig()
  checkpoint: ckpt.CheckpointConfig = ckpt.CheckpointConfig()
  distributed: DistributedConfig = DistributedConfig()
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()  # rank 0: full fine-tuning / pretraining
  dpo: dpo_lib.DpoConfig = dpo_lib.DpoConfig()  # task "": no DPO
  prefix: prefix_lib.PrefixConfig = prefix_lib.PrefixConfig()  # pre_seq_len 0: no P-Tuning v2
  reward: reward_lib.RewardConfig = reward_lib.RewardConfig()  # task "": no reward model


@dataclasses.dataclass
class TrainResult:
  status: str  # "completed" | "preempted" (SIGTERM) | "interrupted" (Ctrl-C)
  step: int
  records: list
  state: Any
  workdir: Optional[str]
  resumed_from: Optional[int] = None
  data_resumed_by: Optional[str] = None  # "iterator" (tf.data state) | "replay" (skip consumed batches)


class NonFiniteLossError(RuntimeError):
  pass


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag; the loop saves a checkpoint at the end
  of the current call (a step, or steps_per_call of them) and exits. A second Ctrl-C raises
  KeyboardInterrupt at once (Python's default)."""

  def __init__(self):
    self.requested = None  # "SIGTERM" | "SIGINT"
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = self.requested or signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def agreed(self) -> bool:
    """Every process stops at the same step: any process's signal stops them all."""
    if jax.process_count() == 1:
      return self.requested is not None
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.array([self.requested is not None], np.int32))
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


def _call_length(step: int, steps_per_call: int, num_steps: int, periods) -> int:
  """Steps in the next call from `step`: at most `steps_per_call`, ending at the end of the run
  and at every multiple of each period in `periods` (checkpoints, evals, steps_per_call itself;
  0 = none), so that those land on the same steps whatever steps_per_call is, and a run resumed
  from any checkpoint makes the calls the uninterrupted run made."""
  count = min(steps_per_call, num_steps - step)
  for period in periods:
    if period:
      count = min(count, period - step % period)
  return count


def _validate(experiment: Experiment) -> None:
  t, d, m = experiment.trainer, experiment.data, experiment.model
  if t.num_steps < 1:
    raise ValueError(f"TrainerConfig.num_steps={t.num_steps} must be >= 1")
  if d.sequence_length > m.max_length:
    raise ValueError(f"DataConfig.sequence_length={d.sequence_length} exceeds ModelConfig.max_length="
                     f"{m.max_length}; shorten the sequences or raise max_length")
  if t.max_nonfinite_streak < 1:
    raise ValueError("TrainerConfig.max_nonfinite_streak must be >= 1")
  step_lib.resolve_steps_per_call(t.steps_per_call, "cpu", 1, t.num_steps)  # the value's type, range
  if t.steps_per_call not in ("auto", 1) and (experiment.dpo.task or experiment.reward.task):
    raise ValueError(f"TrainerConfig.steps_per_call={t.steps_per_call!r} is for the language-model "
                     "step; DPO and reward-model runs take one step per call (set it to 'auto' or 1)")
  data_lib.resolve_prompt_layout(d, m)  # explicit DataConfig layout flags agree with the model


def _tuning(experiment: Experiment, seqio_data: bool):
  """The parameter-efficient method of the run (LoRA / QLoRA, P-Tuning v2), or None."""
  lora = lora_lib.tuning_for(experiment.model, experiment.lora)
  prefix = prefix_lib.tuning_for(experiment.model, experiment.prefix,
                                 experiment.data if seqio_data else None)
  if lora is not None and prefix is not None:
    raise ValueError("LoraConfig.rank and PrefixConfig.pre_seq_len are both set; pick one method "
                     "(set the other to 0)")
  if prefix is not None and experiment.dpo.task:
    raise ValueError("DpoConfig.task with PrefixConfig.pre_seq_len is not supported; DPO runs on LoRA "
                     "(LoraConfig.rank) or a full fine-tune")
  if experiment.reward.task:  # a reward model: {"model", "head"} params, around LoRA or the full model
    if experiment.dpo.task or prefix is not None:
      raise ValueError("RewardConfig.task goes with LoRA (LoraConfig.rank) or a full fine-tune, not with "
                       "DpoConfig.task or PrefixConfig.pre_seq_len")
    return reward_lib.tuning_for(experiment.model, experiment.reward, lora)
  return lora or prefix


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


def _restore_newest(run_dir: workdir_lib.Workdir, program: TrainProgram, config: ckpt.CheckpointConfig,
                    resume_step: Optional[int], note: Callable[[str], None], is_main: bool):
  """(state, data_state, step) of the newest readable step at or below `resume_step`, or
  (None, None, None) for a fresh run. Steps newer than the one used move to skipped_checkpoints/."""
  steps = sorted(run_dir.steps(), reverse=True)
  set_aside = {}  # step -> why
  if resume_step is not None:
    set_aside = {s: f"is newer than --step {resume_step}" for s in steps if s > resume_step}
    steps = [s for s in steps if s <= resume_step]
  if not steps:
    return None, None, None
  manager = ckpt.make_manager(run_dir.checkpoints, dataclasses.replace(config, async_save=False))
  found = None
  try:
    for candidate in steps:
      try:
        state, data_state, _ = ckpt.restore(manager, candidate, program.checkpoint_target())
      except ckpt.CheckpointMismatch:
        raise  # another model / optimizer config: refused, nothing moved
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax: many types)
        set_aside[candidate] = f"is unreadable ({workdir_lib.first_line(e)})"
        continue
      found = (state, data_state, candidate)
      break
  finally:
    manager.close()
  if found is None:
    raise ValueError(f"no readable checkpoint in {run_dir.checkpoints} (steps {sorted(steps)}); "
                     "use a fresh --workdir or pass --step")
  if is_main:
    for step, why in sorted(set_aside.items()):
      target = run_dir.set_aside(step, f"checkpoint step {step} {why}; the run resumed from step {found[2]}")
      note(f"checkpoint step {step} {why}: resuming from step {found[2]}, step {step} moved to {target}")
  return found


def train(experiment: Experiment, workdir: Optional[str] = None, *, train_data=None,
          eval_data: Optional[Iterable[dict]] = None, config_text: str = "",
          devices: Optional[list] = None, resume_step: Optional[int] = None,
          log: Optional[Callable[[str], None]] = None) -> TrainResult:
  """Trains `experiment`; resumes from the newest readable checkpoint in `workdir/checkpoints`.

  An unreadable newest step (truncated file) is moved to `skipped_checkpoints/` and the previous
  one is used; `resume_step` picks a step, moving newer ones aside too (nothing is deleted).
  Nothing is written to `workdir` before the state is restored or built, so a refused run
  (shape mismatch, bad mesh) leaves every file as it was. `log(line)` gets those notes.

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
                         devices=devices, tuning=_tuning(experiment, seqio_data=train_data is None))
  layout = {"batch_size": experiment.data.batch_size, "sequence_length": experiment.data.sequence_length}
  step_fn = program.train_step
  save_every = experiment.checkpoint.save_every if workdir is not None else 0
  steps_per_call = 1  # DPO / reward steps: one per call (_validate refuses more)
  if not (experiment.dpo.task or experiment.reward.task):
    steps_per_call = step_lib.resolve_steps_per_call(
        cfg.steps_per_call, program.platform(), program.mesh.size, cfg.num_steps)
  if experiment.dpo.task:  # DPO on preference pairs (glmjax.tuning.dpo) instead of the LM mixture
    step_fn, train_data = dpo_lib.train_hooks(program, experiment)
  elif experiment.reward.task:  # a Bradley-Terry reward model on preference pairs (glmjax.tuning.reward)
    step_fn, train_data = reward_lib.train_hooks(program, experiment)
  if train_data is None:
    stream = data_lib.train_stream(experiment.data, pid, nproc, model=experiment.model)
    host_rows = lambda b: b  # noqa: E731
  else:
    stream = _as_stream(train_data, layout)
    host_rows = lambda b: _host_rows(b, pid, nproc)  # noqa: E731
  wants_eval = cfg.eval_every > 0 or (cfg.eval_at_end and (eval_data is not None or train_data is None))
  if eval_data is not None:
    eval_host = [batch_lib.to_host_batch(_host_rows(b, pid, nproc)) for b in eval_data]
  elif wants_eval and train_data is None:
    eval_host = data_lib.eval_batches(experiment.data, pid, nproc, model=experiment.model)
  else:
    eval_host = []
  tuned_batch = getattr(program.tuning, "host_batch", None)  # P-Tuning v2: the prefix slots prepended
  if tuned_batch is not None:
    eval_host = [tuned_batch(b) for b in eval_host]

  note = log or (lambda line: log_.warning("%s", line))
  manager = None
  resumed_from = resumed_by = None
  state = None
  if workdir is not None:
    run_dir = workdir_lib.Workdir(workdir)
    if resume_step is not None and resume_step not in run_dir.steps():
      raise ValueError(f"--step {resume_step} is not a checkpoint of {run_dir.path} "
                       f"(steps there: {run_dir.steps()})")
    if experiment.checkpoint.resume:
      state, data_state, resumed_from = _restore_newest(run_dir, program, experiment.checkpoint,
                                                        resume_step, note, is_main)
    manager = ckpt.make_manager(run_dir.checkpoints, experiment.checkpoint)
    if resumed_from is not None:
      resumed_by = ckpt.restore_data_stream(manager, resumed_from, stream, data_state)
      if is_main:
        log_.info("resumed from %s at step %d (data: %s)", manager.directory, resumed_from, resumed_by)
  if state is None:
    state = program.init_state(cfg.seed)
  else:
    state = program.complete_state(state, cfg.seed)  # LoRA: the base is not in the checkpoint
  step = int(jax.device_get(state["step"]))
  if workdir is not None and is_main:
    os.makedirs(workdir, exist_ok=True)
    if config_text:
      workdir_lib.atomic_write_text(run_dir.file(workdir_lib.CONFIG_GIN), config_text)
    run_dir.truncate_metrics(step)

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
    ckpt.save(manager, step, program.checkpoint_state(state), stream.state(), config_info, force=force,
              stream=stream)

  def evaluate() -> None:
    if eval_host:
      record = {"kind": "eval", **_eval(program, state["params"], eval_host)}
      run_log.write(step, record)
      if bar is not None:
        bar.write(f"step {step}: eval loss {record['eval_loss']:.4f} accuracy {record['eval_accuracy']:.3f}")

  try:
    with _StopSignals() as signals:
      last_time = time.perf_counter()
      first_call_of_run = True

      def next_batch() -> dict:
        try:
          host = next(stream)
        except StopIteration:
          raise ValueError(f"the training data ran out after {stream.position} batches, before "
                           f"TrainerConfig.num_steps={cfg.num_steps}") from None
        host = host_rows(host)
        if tuned_batch is not None:
          host = tuned_batch(host)
        batch_lib.check_ids(host, experiment.model)
        return program.global_batch(host)

      while step < cfg.num_steps:
        count = _call_length(step, steps_per_call, cfg.num_steps,
                             (save_every, cfg.eval_every, steps_per_call))
        batches = [next_batch() for _ in range(count)]
        if count == 1:
          state, device_metrics = step_fn(state, batches[0])
          per_step = [jax.device_get(device_metrics)]
        else:
          state, device_metrics = program.train_steps(state, batches)
          stacked = jax.device_get(device_metrics)
          per_step = [{k: v[i] for k, v in stacked.items()} for i in range(count)]
        now = time.perf_counter()
        dt, last_time = (now - last_time) / count, now
        for fetched in per_step:
          m = {k: float(v) for k, v in fetched.items()}
          step += 1
          m.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                   mfu=flops_per_step / dt / peak if peak else 0.0)
          if first_call_of_run:
            m["includes_compile"] = 1.0
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
        first_call_of_run = False
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
          evaluate()
        if manager is not None and manager.should_save(step):
          checkpoint(force=False)
        if signals.agreed():
          stopped_by = signals.requested or "a signal on another process"
          status = "interrupted" if stopped_by == "SIGINT" else "preempted"
          checkpoint(force=True)
          where = f"saved a checkpoint at step {step}" if manager is not None else "no --workdir: nothing saved"
          message = f"{stopped_by}: {where}; exiting"
          if bar is not None:
            bar.write(message)
          else:
            note(message)
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
    workdir_lib.atomic_write_json(os.path.join(workdir, workdir_lib.SUMMARY), {
        "status": status, "step": step, "resumed_from": resumed_from,
        "last": run_log.records[-1] if run_log.records else None})
  return TrainResult(status=status, step=step, records=run_log.records, state=state, workdir=workdir,
                     resumed_from=resumed_from, data_resumed_by=resumed_by)
