"""One tiny GLM run trained through `glmjax train` on an 8-device fsdp=4 x tensor=2 mesh, shared
by the command-line tests (train once, then generate / eval / export / resume read it)."""

import os
import shutil

import pytest

from glmjax import cli, config_gin
from tests.sharding.test_distributed import REPO

TINY_GLM = [  # the demo experiment shrunk; every dim divides fsdp=4 / tensor=2
    "ModelConfig.d_model = 64", "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 2",
    "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 32", "ModelConfig.ffn_dim = 128",
    "ModelConfig.max_length = 64", "DataConfig.sequence_length = 64", "DataConfig.batch_size = 8",
    "DataConfig.eval_batches = 1", "OptimizerConfig.warmup_steps = 1",
    "TrainerConfig.progress_bar = False", "TrainerConfig.plot = False",
    "TrainerConfig.eval_at_end = False", "TrainerConfig.peak_flops_per_device = 1e9",
    "CheckpointConfig.save_every = 2", "CheckpointConfig.keep = 5", "CheckpointConfig.async_save = False",
    "MeshConfig.data = 1", "MeshConfig.fsdp = 4", "MeshConfig.tensor = 2",
]
STEPS = 4


def train_args(workdir, steps=STEPS, extra=()):
  bindings = TINY_GLM + [f"TrainerConfig.num_steps = {steps}"] + list(extra)
  return (["train", "--gin_file", os.path.join(REPO, "experiments", "demo.gin"), "--workdir", str(workdir)]
          + [a for b in bindings for a in ("--gin", b)])


def run_cli(argv):
  config_gin.clear()
  try:
    return cli.main(list(argv))
  finally:
    config_gin.clear()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A read-only workdir with steps 2 and 4 (copy it before changing anything)."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  assert run_cli(train_args(workdir)) == 0
  return str(workdir)


@pytest.fixture
def run_copy(trained_run, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(trained_run, target)
  return str(target)
