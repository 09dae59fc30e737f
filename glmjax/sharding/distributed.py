"""Multi-host runs on JAX's own distributed runtime, and host batches -> global arrays.

Every process runs the same program. `initialize` calls `jax.distributed.initialize`
when asked (config or environment); each process then reads only its own data
shards and `global_batch` assembles the global batch from the processes' local
rows with `jax.make_array_from_process_local_data` (process p holds rows
[p * B/P, (p+1) * B/P) of the global batch).

Environment (overrides nothing that the config sets explicitly):
  GLMJAX_COORDINATOR   host:port of process 0's coordinator
  GLMJAX_NUM_PROCESSES number of processes
  GLMJAX_PROCESS_ID    this process's id, 0..N-1
On TPU pods, Slurm and Open MPI, `DistributedConfig(initialize="yes")` with no
addresses lets JAX detect the cluster itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import numpy as np

INITIALIZE_CHOICES = ("auto", "yes", "no")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """`initialize`: "auto" (only when GLMJAX_COORDINATOR is set), "yes" or "no"."""
  initialize: str = "auto"
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  cpu_collectives: str = "gloo"  # CPU-only runs across processes need gloo (or mpi)
  initialization_timeout_s: int = 300


def _from_env(config: DistributedConfig) -> DistributedConfig:
  env = os.environ
  updates = {}
  if config.coordinator_address is None and env.get("GLMJAX_COORDINATOR"):
    updates["coordinator_address"] = env["GLMJAX_COORDINATOR"]
  if config.num_processes is None and env.get("GLMJAX_NUM_PROCESSES"):
    updates["num_processes"] = int(env["GLMJAX_NUM_PROCESSES"])
  if config.process_id is None and env.get("GLMJAX_PROCESS_ID"):
    updates["process_id"] = int(env["GLMJAX_PROCESS_ID"])
  return dataclasses.replace(config, **updates)


def should_initialize(config: DistributedConfig) -> bool:
  if config.initialize not in INITIALIZE_CHOICES:
    raise ValueError(f"DistributedConfig.initialize={config.initialize!r} is not one of "
                     f"{INITIALIZE_CHOICES}")
  if config.initialize == "auto":
    return bool(os.environ.get("GLMJAX_COORDINATOR")) or config.coordinator_address is not None
  return config.initialize == "yes"


def initialize(config: DistributedConfig) -> bool:
  """Starts JAX's distributed runtime if asked; must run before any other JAX call. Returns
  whether it did. Safe to call twice (a second call is a no-op)."""
  if not should_initialize(config):
    return False
  config = _from_env(config)
  if jax.distributed.is_initialized():
    return True
  if config.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes, process_id=config.process_id,
                             initialization_timeout=config.initialization_timeout_s)
  return True


def global_batch(local_batch: dict, sharding: jax.sharding.NamedSharding, global_batch_size: int) -> dict:
  """Host-local rows (numpy, [B/P, L] per field) -> global jax.Arrays [B, L] with `sharding`."""
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    shape = (global_batch_size,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
  return out
