"""One process of the two-process test: `python -m tests.sharding.distributed_worker PID PORT`.

Two emulated CPU devices per process, JAX's distributed runtime on 127.0.0.1
with gloo collectives; trains the shared experiment and prints its losses.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(process_id: int, port: int) -> None:
  import dataclasses  # pylint: disable=import-outside-toplevel

  from glmjax.sharding import DistributedConfig  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import train  # pylint: disable=import-outside-toplevel
  from tests.sharding.test_distributed import experiment, global_batches  # pylint: disable=import-outside-toplevel
  from tests.train.helpers import use_test_compilation_cache  # pylint: disable=import-outside-toplevel

  use_test_compilation_cache()

  exp = dataclasses.replace(experiment(), distributed=DistributedConfig(
      initialize="yes", coordinator_address=f"127.0.0.1:{port}", num_processes=2,
      process_id=process_id, initialization_timeout_s=120))
  result = train(exp, train_data=global_batches)
  import jax  # pylint: disable=import-outside-toplevel
  losses = [r["loss"] for r in result.records if r.get("kind") == "train"]
  print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                "devices": jax.device_count(), "losses": losses}), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
