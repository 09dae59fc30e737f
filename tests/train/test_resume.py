"""Checkpoints: exact resume (losses, params, data position) and shape-mismatch errors."""

import contextlib
import dataclasses
import glob
import os
import shutil

import jax
import numpy as np
import pytest

from glmjax.sharding import MeshConfig
from glmjax.trainer import (CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig,
                            train)
from glmjax.trainer.metrics import read_jsonl
from tests.train.helpers import synthetic_task, tiny_model

STEPS = 20


def experiment(task, num_steps):
  return Experiment(
      model=tiny_model(), mesh=MeshConfig(data=-1, fsdp=2),
      # decay_steps fixed so the 10-step leg has the 20-step run's schedule.
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=3, decay_steps=STEPS),
      data=DataConfig(mixture=task, sequence_length=32, batch_size=8),
      trainer=TrainerConfig(num_steps=num_steps, progress_bar=False, eval_at_end=False, plot=False,
                            peak_flops_per_device=1e9),
      checkpoint=CheckpointConfig(save_every=4, keep=2))


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["kind"] == "train"}


@contextlib.contextmanager
def counting_skips(calls):
  """Records every `tf.data.Dataset.skip(count)` (the replay resume's only way to move ahead)."""
  import tensorflow as tf
  original = tf.data.Dataset.skip

  def skip(self, count, name=None):
    calls.append(int(count))
    return original(self, count, name=name)
  tf.data.Dataset.skip = skip
  try:
    yield calls
  finally:
    tf.data.Dataset.skip = original


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  with synthetic_task() as task:
    straight_dir = str(tmp_path_factory.mktemp("straight"))
    straight = train(experiment(task, STEPS), straight_dir)
    split_dir = str(tmp_path_factory.mktemp("split"))
    first = train(experiment(task, STEPS // 2), split_dir)
    # The same first leg as a checkpoint from before iterator states: it must resume by replay.
    replay_dir = str(tmp_path_factory.mktemp("replay") / "run")
    shutil.copytree(split_dir, replay_dir)
    for state_dir in glob.glob(os.path.join(replay_dir, "checkpoints", "*", "data_iterator")):
      shutil.rmtree(state_dir)
    with counting_skips([]) as second_skips:
      second = train(experiment(task, STEPS), split_dir)
    with counting_skips([]) as replay_skips:
      replayed = train(experiment(task, 16), replay_dir)
    # Its checkpoints come from a pipeline opened with skip(10); their iterator states must fit it.
    after_replay = train(experiment(task, STEPS), replay_dir)
  return straight, first, second, dict(second=second_skips, replayed=replayed, replay_skips=replay_skips,
                                       after_replay=after_replay)


def assert_same_run(want_result, got_result):
  want, got = losses(want_result.workdir), losses(got_result.workdir)
  assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bitwise, every step
  for a, b in zip(jax.tree.leaves(jax.device_get(want_result.state)),
                  jax.tree.leaves(jax.device_get(got_result.state))):
    np.testing.assert_array_equal(a, b)


def test_resumed_run_matches_the_uninterrupted_one(runs):
  straight, first, second, _ = runs
  assert first.resumed_from is None and first.step == STEPS // 2
  assert second.resumed_from == STEPS // 2 and second.step == STEPS
  assert_same_run(straight, second)


def test_tf_data_resume_restores_the_iterator_state_without_replay(runs):
  _, _, second, extra = runs
  for step in (16, STEPS):  # the kept checkpoints (step 10, resumed from, is pruned by keep=2)
    state_dir = os.path.join(second.workdir, "checkpoints", str(step), "data_iterator")
    assert os.path.exists(os.path.join(state_dir, "process_0_of_1.index")), os.listdir(state_dir)
  assert second.data_resumed_by == "iterator"
  assert not [n for n in extra["second"] if n > 0], f"resume skipped batches: {extra['second']}"


def test_checkpoint_without_iterator_state_resumes_by_replay_and_matches(runs):
  """Replay 10 -> 16, then the iterator state saved after that replay 16 -> 20: still bitwise."""
  straight, _, _, extra = runs
  replayed, after_replay = extra["replayed"], extra["after_replay"]
  assert replayed.resumed_from == STEPS // 2 and replayed.data_resumed_by == "replay"
  assert STEPS // 2 in extra["replay_skips"]
  assert after_replay.resumed_from == 16 and after_replay.data_resumed_by == "iterator"
  assert_same_run(straight, after_replay)


def test_checkpoints_keep_the_newest_and_hold_the_data_position(runs):
  _, _, second, _ = runs
  ckpt_dir = os.path.join(second.workdir, "checkpoints")
  steps = sorted(int(name) for name in os.listdir(ckpt_dir) if name.isdigit())
  assert steps == [16, 20]  # keep=2
  import json
  with open(os.path.join(ckpt_dir, "20", "data", "metadata"), encoding="utf-8") as f:
    assert json.load(f)["batches"] == STEPS


def test_loading_into_other_shapes_lists_the_mismatched_params(runs, tmp_path):
  straight, _, _, _ = runs
  with synthetic_task() as task:
    exp = experiment(task, STEPS + 1)
    exp = dataclasses.replace(exp, model=tiny_model(ffn_dim=128))
    with pytest.raises(ValueError) as info:
      train(exp, straight.workdir)
  message = str(info.value)
  assert "does not match this config's shapes" in message
  assert "params/layers/mlp/w_up: checkpoint (2, 32, 64) != config (2, 32, 128)" in message
  assert "params/layers/mlp/w_down: checkpoint (2, 64, 32) != config (2, 128, 32)" in message
  assert "params/layers/attn/wq" not in message
