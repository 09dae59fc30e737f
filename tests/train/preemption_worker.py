"""A training run for the kill tests: `python -m tests.train.preemption_worker WORKDIR [STEPS SAVE_EVERY]`.

By default long and saving asynchronously after every step, so a save is almost always in
flight. Prints `STATUS <status> <step>` and `PARAMS <sha256 of the params' bytes>` at the end.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(workdir: str, num_steps: int = 100_000, save_every: int = 1) -> None:
  import hashlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
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
      trainer=TrainerConfig(num_steps=num_steps, progress_bar=False, eval_at_end=False, plot=False,
                            peak_flops_per_device=1e9),
      checkpoint=CheckpointConfig(save_every=save_every, keep=3, async_save=True))
  result = train(experiment, workdir, train_data=lambda: endless_random_batches(4, 16, seed=11))
  print(f"STATUS {result.status} {result.step}", flush=True)
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(jax.device_get(result.state["params"])):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  print(f"PARAMS {digest.hexdigest()}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
