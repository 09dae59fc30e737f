"""A tiny GLM trained by the default experiment (experiments/demo.gin), shrunk to fit a test.

Shared by every test in this package (session scope): trained once per run.
"""

import pytest

# The Quickstart experiment with a smaller model and run: about a minute on 2 CPU cores.
DEMO_OVERRIDES = [
    "ModelConfig.d_model = 64", "ModelConfig.num_layers = 2", "ModelConfig.head_dim = 16",
    "ModelConfig.ffn_dim = 256", "ModelConfig.max_length = 128",
    "DataConfig.batch_size = 16", "DataConfig.sequence_length = 128",
    "OptimizerConfig.learning_rate = 1e-2", "OptimizerConfig.warmup_steps = 20",
    "TrainerConfig.num_steps = 300", "TrainerConfig.eval_every = 0", "TrainerConfig.eval_at_end = False",
    "TrainerConfig.progress_bar = False", "TrainerConfig.plot = False",
    "CheckpointConfig.save_every = 0", "CheckpointConfig.async_save = False",
]


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  from glmjax.cli import train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("demo_run")
  argv = ["--gin_file", "experiments/demo.gin", "--workdir", str(workdir)]
  for binding in DEMO_OVERRIDES:
    argv += ["--gin", binding]
  try:
    assert train.main(argv) == 0
  finally:
    config_gin.clear()
  return workdir
