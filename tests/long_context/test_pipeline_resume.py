"""GPipe training through `glmjax.trainer.train` on a stage=2 x fsdp=2 mesh (8 devices):
a run stopped after 4 steps and resumed from its checkpoint reproduces the uninterrupted
8-step run bitwise (every step's loss, every final param and optimizer moment); and the
pipelined run follows the unpipelined data-parallel run's losses (1e-5 relative).
The circular schedule (pipeline_repeats=2): its 4 steps follow the unpipelined run's losses, and
its checkpoint keeps the natural layer order, so the run resumed on the unpipelined mesh continues
with the unpipelined run's losses and params (1e-5); a permuted checkpoint would diverge."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from glmjax.sharding import MeshConfig
from glmjax.trainer import CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig, train
from glmjax.trainer.metrics import read_jsonl
from tests.train.helpers import synthetic_task, tiny_model

STEPS = 8


def experiment(task, num_steps, mesh, microbatches=4):
  return Experiment(
      model=tiny_model(num_layers=4), mesh=mesh,
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=STEPS),
      data=DataConfig(mixture=task, sequence_length=32, batch_size=16),
      trainer=TrainerConfig(num_steps=num_steps, microbatches=microbatches, progress_bar=False, eval_at_end=False,
                            plot=False, peak_flops_per_device=1e9),
      checkpoint=CheckpointConfig(save_every=4, keep=2))


def losses(result):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(result.workdir, "metrics.jsonl"))
          if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  stage_mesh = MeshConfig(data=2, fsdp=2, stage=2)
  with synthetic_task() as task:
    straight = train(experiment(task, STEPS, stage_mesh), str(tmp_path_factory.mktemp("straight")))
    split_dir = str(tmp_path_factory.mktemp("split"))
    first = train(experiment(task, STEPS // 2, stage_mesh), split_dir)
    resumed = train(experiment(task, STEPS, stage_mesh), split_dir)
    flat = train(experiment(task, STEPS, MeshConfig(data=-1, fsdp=2), microbatches=1), str(tmp_path_factory.mktemp("flat")))
  return straight, first, resumed, flat


@pytest.fixture(scope="module")
def circular_runs(runs, tmp_path_factory):
  """(4 circular steps, then 4 more from their checkpoint on the unpipelined mesh, the flat run)."""
  circular_mesh = MeshConfig(data=2, fsdp=2, stage=2, pipeline_schedule="circular", pipeline_repeats=2)
  with synthetic_task() as task:
    workdir = str(tmp_path_factory.mktemp("circular"))
    first = train(experiment(task, STEPS // 2, circular_mesh), workdir)
    then_flat = train(experiment(task, STEPS, MeshConfig(data=-1, fsdp=2), microbatches=1), workdir)
  return first, then_flat, runs[3]


def test_stage_mesh_params_are_split_over_stages(runs):
  straight = runs[0]
  wq = straight.state["params"]["layers"]["attn"]["wq"]
  assert tuple(wq.sharding.spec)[0] == "stage"
  assert wq.sharding.shard_shape(wq.shape)[0] == wq.shape[0] // 2  # 2 of the 4 layers per stage


def test_resume_on_a_stage_mesh_is_bitwise_exact(runs):
  straight, first, resumed, _ = runs
  assert first.step == STEPS // 2 and resumed.resumed_from == STEPS // 2
  want, got = losses(straight), losses(resumed)
  assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)


def test_pipelined_training_follows_the_unpipelined_run(runs):
  straight, _, _, flat = runs
  want, got = losses(flat), losses(straight)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
  assert got[STEPS] < got[1]  # it learns


def test_circular_checkpoint_is_layout_independent(circular_runs):
  first, then_flat, flat = circular_runs
  assert first.step == STEPS // 2 and then_flat.resumed_from == STEPS // 2
  want, got_flat = losses(flat), losses(then_flat)  # steps 1-4 circular, 5-8 flat: one metrics file
  assert sorted(got_flat) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got_flat[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(jax.device_get(then_flat.state["params"])),
                      jax.tree.leaves(jax.device_get(flat.state["params"]))):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
