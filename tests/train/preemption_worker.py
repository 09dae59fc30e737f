"""A long training run for the kill tests: `python -m tests.train.preemption_worker WORKDIR`.

Saves asynchronously after every step, so a save is almost always in flight.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(workdir: str) -> None:
  from glmjax.sharding import MeshConfig  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import (CheckpointConfig, DataConfig, Experiment,  # pylint: disable=import-outside-toplevel
                              OptimizerConfig, TrainerConfig, train)
  from tests.train.helpers import endless_random_batches, tiny_model  # pylint: disable=import-outside-toplevel
  from tests.train.helpers import use_test_compilation_cache  # pylint: disable=import-outside-toplevel

  use_test_compilation_cache()

  experiment = Experiment(
      model=tiny_model(), mesh=MeshConfig(data=1),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
      data=DataConfig(sequence_length=16, batch_size=4),
      trainer=TrainerConfig(num_steps=100_000, progress_bar=False, eval_at_end=False, plot=False,
                            peak_flops_per_device=1e9),
      checkpoint=CheckpointConfig(save_every=1, keep=3, async_save=True))
  result = train(experiment, workdir, train_data=lambda: endless_random_batches(4, 16, seed=11))
  print(f"STATUS {result.status} {result.step}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
