"""Two processes on loopback (jax.distributed, gloo CPU collectives, 2 devices each) train
exactly like one process with 4 devices: each process feeds its half of the global batch
(`make_array_from_process_local_data`) and gets the same losses. (Which seqio shards a process
reads is tested in tests/train/test_data.py.)"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from glmjax.sharding import MeshConfig
from glmjax.trainer import (CheckpointConfig, DataConfig, Experiment, OptimizerConfig, TrainerConfig,
                            train)
from tests.train.helpers import random_batches, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


STEPS = 4


def experiment() -> Experiment:
  """Shared by this test and the worker processes."""
  return Experiment(
      model=tiny_model(), mesh=MeshConfig(data=-1, fsdp=2),
      optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      data=DataConfig(sequence_length=32, batch_size=8),
      trainer=TrainerConfig(num_steps=STEPS, progress_bar=False, eval_at_end=False, plot=False,
                            peak_flops_per_device=1e9),
      checkpoint=CheckpointConfig(save_every=0))


def global_batches():
  """The same global batches in every process; each process keeps its rows."""
  return random_batches(STEPS, 8, 32, seed=3)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices():
  port = free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  workers = [subprocess.Popen([sys.executable, "-m", "tests.sharding.distributed_worker", str(i), str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  reference = train(experiment(), train_data=global_batches, devices=jax.devices()[:4])
  expected = [r["loss"] for r in reference.records if r.get("kind") == "train"]

  results = []
  for worker in workers:
    try:
      out, _ = worker.communicate(timeout=300)
    finally:
      worker.kill()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert worker.returncode == 0 and lines, out[-3000:]
    results.append(json.loads(lines[-1][len("RESULT "):]))
  assert sorted(r["process"] for r in results) == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 4 for r in results)
  assert len(expected) == STEPS
  for r in results:
    np.testing.assert_allclose(r["losses"], expected, rtol=2e-6)
