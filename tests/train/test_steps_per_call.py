"""Several updates per jitted call (TrainerConfig.steps_per_call, TrainProgram.train_steps): the
same updates bit for bit as one call per step, calls that end at every checkpoint / eval step,
resume across them, and what "auto" resolves to."""

import itertools
import os

import jax
import numpy as np
import pytest

from glmjax.sharding import MeshConfig
from glmjax.trainer import (CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig,
                            TrainProgram, train)
from glmjax.trainer import loop as loop_lib
from glmjax.trainer import step as step_lib
from glmjax.trainer.metrics import read_jsonl
from tests.train.helpers import random_batches, tiny_model

BATCH, LENGTH = 8, 16
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=12, grad_clip_norm=1.0)


def one_device_program(num_steps=12):
  return TrainProgram(tiny_model(), OPTIMIZER, MeshConfig(data=1), num_steps=num_steps,
                      global_batch_size=BATCH, devices=jax.devices()[:1])


def assert_trees_equal(want, got):
  for a, b in zip(jax.tree.leaves(jax.device_get(want)), jax.tree.leaves(jax.device_get(got))):
    np.testing.assert_array_equal(a, b)


def test_train_steps_are_the_single_steps_bit_for_bit():
  program = one_device_program()
  batches = random_batches(3, BATCH, LENGTH, seed=11)
  single = program.init_state(0)
  single_metrics = []
  for batch in batches:
    single, m = program.train_step(single, batch)
    single_metrics.append(jax.device_get(m))
  grouped, stacked = program.train_steps(program.init_state(0), batches)
  stacked = jax.device_get(stacked)
  assert_trees_equal(single, grouped)  # params, optimizer state, step, counters
  assert int(grouped["step"]) == 3
  for key in ("loss", "grad_norm", "learning_rate", "accuracy"):
    assert stacked[key].shape == (3,)
    np.testing.assert_allclose(stacked[key], [m[key] for m in single_metrics], rtol=1e-6, err_msg=key)


def call_ends(start, steps_per_call, num_steps, periods):
  ends, step = [], start
  while step < num_steps:
    count = loop_lib._call_length(step, steps_per_call, num_steps, periods)  # pylint: disable=protected-access
    assert 1 <= count <= steps_per_call
    step += count
    ends.append(step)
  return ends


@pytest.mark.parametrize("steps_per_call, num_steps, save_every, eval_every",
                         list(itertools.product((1, 3, 4), (7, 12, 13), (0, 4, 5), (0, 3, 6))))
def test_calls_end_at_every_checkpoint_and_eval_step_and_resume_makes_the_same_calls(
    steps_per_call, num_steps, save_every, eval_every):
  periods = (save_every, eval_every, steps_per_call)
  ends = call_ends(0, steps_per_call, num_steps, periods)
  must = {num_steps} | {s for p in (save_every, eval_every) if p for s in range(p, num_steps + 1, p)}
  assert must <= set(ends)
  assert ends == sorted(set(ends)) and ends[-1] == num_steps
  for resumed_at in ends[:-1]:  # a run resumed from a checkpoint at any call's end
    assert call_ends(resumed_at, steps_per_call, num_steps, periods) == [e for e in ends if e > resumed_at]


def test_auto_is_four_on_one_cpu_device_for_long_runs_only():
  resolve = step_lib.resolve_steps_per_call
  assert resolve("auto", "cpu", 1, 64) == step_lib.CPU_STEPS_PER_CALL == 4
  assert resolve("auto", "cpu", 1, 63) == 1  # short runs (and tests) keep one compile
  assert resolve("auto", "cpu", 8, 1000) == 1  # an emulated multi-device mesh
  assert resolve("auto", "tpu", 1, 1000) == resolve("auto", "gpu", 1, 1000) == 1
  assert resolve(3, "tpu", 4, 10) == 3
  for bad in (0, -1, 2.0, True, "four", None):
    with pytest.raises(ValueError, match="TrainerConfig.steps_per_call"):
      resolve(bad, "cpu", 1, 100)


def experiment(num_steps, steps_per_call):
  return Experiment(
      model=tiny_model(), mesh=MeshConfig(data=1), optimizer=OPTIMIZER,
      data=DataConfig(sequence_length=LENGTH, batch_size=BATCH),
      trainer=TrainerConfig(num_steps=num_steps, eval_every=5, eval_at_end=True, progress_bar=False,
                            plot=False, peak_flops_per_device=1e9, steps_per_call=steps_per_call),
      checkpoint=CheckpointConfig(save_every=4, keep=5, async_save=False))


TRAIN = random_batches(12, BATCH, LENGTH, seed=3)
EVAL = random_batches(2, BATCH, LENGTH, seed=4)


def run(workdir, num_steps, steps_per_call, calls):
  """train() on one device; `calls` gets the length of every call (train_step calls count 1)."""
  original_steps, original_step = TrainProgram.train_steps, TrainProgram.train_step

  def counting_steps(self, state, batches):
    calls.append(len(batches))
    return original_steps(self, state, batches)

  def counting_step(self, state, batch):
    calls.append(1)
    return original_step(self, state, batch)

  TrainProgram.train_steps, TrainProgram.train_step = counting_steps, counting_step
  try:
    return train(experiment(num_steps, steps_per_call), str(workdir), train_data=lambda: TRAIN,
                 eval_data=EVAL, devices=jax.devices()[:1])
  finally:
    TrainProgram.train_steps, TrainProgram.train_step = original_steps, original_step


def records(workdir, kind):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == kind}


def checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for name, steps_per_call in (("one", 1), ("four", 4)):
    calls = []
    workdir = tmp_path_factory.mktemp(name)
    out[name] = (run(workdir, 12, steps_per_call, calls), calls)
  first, second = [], []
  split = tmp_path_factory.mktemp("split")
  run(split, 6, 4, first)  # stops at 6 (a checkpoint: save_at_end), then resumes to 12
  out["split"] = (run(split, 12, 4, second), (first, second))
  return out


def test_four_steps_per_call_train_the_same_run_as_one(runs):
  one, one_calls = runs["one"]
  four, four_calls = runs["four"]
  assert one_calls == [1] * 12
  # Calls end at the checkpoints (4, 8), the evals (5, 10) and the end (12); never longer than 4.
  assert four_calls == [4, 1, 3, 2, 2]
  assert list(itertools.accumulate(four_calls)) == call_ends(0, 4, 12, (4, 5, 4)) == [4, 5, 8, 10, 12]
  assert_trees_equal(one.state, four.state)
  want, got = records(one.workdir, "train"), records(four.workdir, "train")
  assert sorted(want) == sorted(got) == list(range(1, 13))
  np.testing.assert_allclose([got[s]["loss"] for s in got], [want[s]["loss"] for s in want], rtol=1e-6)
  assert records(one.workdir, "eval").keys() == records(four.workdir, "eval").keys() == {5, 10, 12}
  np.testing.assert_allclose([r["eval_loss"] for r in records(four.workdir, "eval").values()],
                             [r["eval_loss"] for r in records(one.workdir, "eval").values()], rtol=1e-6)
  # The periodic ones and the end in both (orbax also saves the first step it is asked about:
  # step 1 with one step per call, step 4, periodic anyway, with four).
  assert checkpoint_steps(four.workdir) == [4, 8, 12]
  assert set(checkpoint_steps(one.workdir)) - {1} == {4, 8, 12}
  compiled = [r for r in got.values() if r.get("includes_compile")]
  assert [r["step"] for r in compiled] == [1, 2, 3, 4]  # the first call's steps share its time


def test_a_run_resumed_across_calls_matches_the_uninterrupted_one(runs):
  four, _ = runs["four"]
  resumed, (first, second) = runs["split"]
  assert sum(first) == 6 and resumed.resumed_from == 6 and sum(second) == 6
  assert_trees_equal(four.state, resumed.state)
  want, got = records(four.workdir, "train"), records(resumed.workdir, "train")
  assert sorted(got) == list(range(1, 13))
  np.testing.assert_allclose([got[s]["loss"] for s in sorted(got)], [want[s]["loss"] for s in sorted(want)],
                             rtol=1e-6)
