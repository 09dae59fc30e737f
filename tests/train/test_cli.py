"""`glmjax train` end to end on the default experiment's data (GLM blank infilling on the
embedded corpus), shrunk: outputs in the workdir, loss falls, re-running resumes."""

import json
import os

import pytest

from glmjax import config_gin
from glmjax.cli import train as train_cli
from glmjax.trainer.metrics import read_jsonl
from tests.train.test_gin import REPO

SHRINK = ["ModelConfig.d_model = 64", "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 2",
          "ModelConfig.num_kv_heads = 2", "ModelConfig.ffn_dim = 128", "ModelConfig.max_length = 64",
          "DataConfig.sequence_length = 64", "DataConfig.batch_size = 8", "DataConfig.eval_batches = 1",
          "OptimizerConfig.warmup_steps = 2", "OptimizerConfig.learning_rate = 3e-3",
          "TrainerConfig.eval_every = 6", "TrainerConfig.peak_flops_per_device = 1e9",
          "CheckpointConfig.save_every = 6", "MeshConfig.data = 2", "MeshConfig.fsdp = -1"]


def run(workdir, steps):
  config_gin.clear()
  try:
    return train_cli.main(["--gin_file", "experiments/demo.gin", "--workdir", workdir]
                          + [f"--gin={b}" for b in SHRINK] + [f"--gin.TrainerConfig.num_steps={steps}"])
  finally:
    config_gin.clear()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cli") / "run")
  old = os.getcwd()
  os.chdir(REPO)
  try:
    assert run(path, 12) == 0
    yield path
  finally:
    os.chdir(old)


def test_outputs_are_written(workdir):
  assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == ["12", "6"]
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  with open(os.path.join(workdir, "config.gin"), encoding="utf-8") as f:
    config = f.read()
  assert "ModelConfig.d_model = 64" in config and "DataConfig.mixture = 'glmjax_blank_infilling_default'" in config
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 13))
  for key in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "step_time_s"):
    assert all(key in r for r in train), key
  assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12]


def test_loss_falls(workdir):
  train = [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"]
  assert train[0] > 8.5  # about log(8192) = 9.01 at init
  assert sum(train[-3:]) / 3 < train[0] - 0.5


def test_rerun_resumes_from_the_latest_checkpoint(workdir, monkeypatch):
  monkeypatch.chdir(REPO)
  assert run(workdir, 14) == 0
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["resumed_from"] == 12 and summary["step"] == 14 and summary["status"] == "completed"
