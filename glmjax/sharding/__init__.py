"""Mesh, logical-axis rules, shardings for params / optimizer state / batches, multi-host.

    mesh = make_mesh(MeshConfig(data=2, fsdp=-1))
    shardings = param_shardings(model_config, mesh, MeshConfig().rules)
    with activation_sharding(mesh, rules):   # model constraints bind to the mesh
      ...jit tracing...
"""

from glmjax.sharding.distributed import DistributedConfig, global_batch, initialize
from glmjax.sharding.mesh import DEFAULT_RULES, MESH_AXES, MeshConfig, make_mesh, resolve_axis_sizes
from glmjax.sharding.partition import (activation_sharding, batch_divisor, batch_sharding,
                                       check_divisible, logical_to_spec, normalise_rules,
                                       opt_state_shardings, param_partition_specs, param_shardings,
                                       replicated)

__all__ = ["DEFAULT_RULES", "DistributedConfig", "MESH_AXES", "MeshConfig", "activation_sharding",
           "batch_divisor", "batch_sharding", "check_divisible", "global_batch", "initialize",
           "logical_to_spec", "make_mesh", "normalise_rules", "opt_state_shardings",
           "param_partition_specs", "param_shardings", "replicated", "resolve_axis_sizes"]
