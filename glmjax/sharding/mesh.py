"""Device mesh from config: axes `data`, `fsdp`, `stage`, `context`, `tensor`, `expert` (DESIGN.md s. 4).

    mesh = make_mesh(MeshConfig(data=-1, tensor=2))   # -1 fills the remaining devices

`data` replicates params and splits the batch; `fsdp` splits the batch and
shards params/optimizer state along `embed` (ZeRO-3 style); `stage` splits the stacked
`layers` into pipeline stages (glmjax.trainer.pipeline; `pipeline_schedule` 'gpipe' or
'circular' with `pipeline_repeats` layer chunks per stage); `context` splits the
sequence (`length`; ring attention, glmjax.pallas.ring); `tensor` shards
heads / mlp / vocab (Megatron style); `expert` shards MoE experts.

Multi-slice pods (devices with several `slice_index` values, joined by the
data-centre network): `dcn_data` and `dcn_fsdp` say how many slices the
`data` / `fsdp` axes span (MaxText's dcn_*_parallelism); the axis sizes stay
global, so `data=4, dcn_data=2` is 2 slices x 2-way data parallel inside each.
By default `data` spans all slices: only its gradient all-reduce crosses DCN,
once a step, while fsdp gathers and tensor traffic stay on ICI.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "stage", "context", "tensor", "expert")

# Logical axis name -> mesh axis (or axes), in order of precedence. A mesh axis
# is used at most once per array (the first rule that claims it wins), so for
# an activation [batch, length, embed] `batch` takes `fsdp` and `embed` stays whole.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("layers", "stage"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: all remaining devices) and the logical-axis rules."""
  data: int = -1
  fsdp: int = 1
  stage: int = 1
  context: int = 1
  tensor: int = 1
  expert: int = 1
  rules: tuple = DEFAULT_RULES
  dcn_data: int = -1  # slices the data axis spans (-1: all slices the fsdp axis leaves)
  dcn_fsdp: int = 1  # slices the fsdp axis spans
  # With stage > 1: 'gpipe' (stage s holds one contiguous block of layers) or 'circular' (stage s
  # holds pipeline_repeats chunks s, stage + s, ...; bubble (S-1)/(R M + S-1)); glmjax.trainer.pipeline.
  pipeline_schedule: str = "gpipe"
  pipeline_repeats: int = 1

  def axis_sizes(self) -> dict:
    return {name: getattr(self, name) for name in MESH_AXES}


def resolve_axis_sizes(config: MeshConfig, num_devices: int) -> dict:
  """Axis sizes with the -1 filled in; ValueError naming the field and the fix otherwise."""
  sizes = config.axis_sizes()
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"MeshConfig.{name}={size!r}: each mesh axis size must be a positive int "
                       "or -1 (fill the remaining devices)")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"MeshConfig: at most one axis may be -1, got {', '.join(fill)} = -1; "
                     "give all but one of them an explicit size")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = " x ".join(f"{name}={size}" for name, size in sizes.items())
  if fill:
    if num_devices % fixed:
      raise ValueError(f"MeshConfig ({described}): the fixed axes multiply to {fixed}, which does not "
                       f"divide the {num_devices} devices; pick sizes whose product divides {num_devices}")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"MeshConfig ({described}): the axes multiply to {fixed} but there are "
                     f"{num_devices} devices; make the product {num_devices} or set one axis to -1")
  return sizes


PIPELINE_SCHEDULES = ("gpipe", "circular")


def pipeline_repeats(config: MeshConfig) -> int:
  """Layer chunks per stage that MeshConfig.pipeline_schedule / pipeline_repeats ask for (1 for
  GPipe); one-line ValueError naming the field when they do not make a schedule."""
  schedule, repeats = config.pipeline_schedule, config.pipeline_repeats
  if schedule not in PIPELINE_SCHEDULES:
    raise ValueError(f"MeshConfig.pipeline_schedule={schedule!r} is not one of "
                     f"{', '.join(map(repr, PIPELINE_SCHEDULES))}")
  if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"MeshConfig.pipeline_repeats={repeats!r} must be a positive int (layer chunks per stage)")
  if schedule == "gpipe" and repeats != 1:
    raise ValueError(f"MeshConfig.pipeline_repeats={repeats} needs MeshConfig.pipeline_schedule='circular' "
                     "(GPipe holds one contiguous chunk of layers per stage)")
  return repeats


def num_slices(devices: Sequence) -> int:
  return len({int(getattr(d, "slice_index", 0) or 0) for d in devices})


def resolve_dcn_sizes(config: MeshConfig, sizes: dict, slices: int) -> dict:
  """Slices each mesh axis spans (the DCN part of its size); ValueError naming the field."""
  for name in ("dcn_data", "dcn_fsdp"):
    value = getattr(config, name)
    if not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"MeshConfig.{name}={value!r} must be a positive int or -1")
  if config.dcn_fsdp == -1:
    raise ValueError("MeshConfig.dcn_fsdp=-1: only dcn_data may fill the slices; give dcn_fsdp a size")
  fsdp = config.dcn_fsdp
  if slices % fsdp:
    raise ValueError(f"MeshConfig.dcn_fsdp={fsdp} does not divide the {slices} slices")
  data = slices // fsdp if config.dcn_data == -1 else config.dcn_data
  if data * fsdp != slices:
    raise ValueError(f"MeshConfig.dcn_data={data} x dcn_fsdp={fsdp} must equal the {slices} slices")
  dcn = {"data": data, "fsdp": fsdp, "stage": 1, "context": 1, "tensor": 1, "expert": 1}
  for name, parts in dcn.items():
    if sizes[name] % parts:
      raise ValueError(f"MeshConfig.{name}={sizes[name]} cannot span {parts} slices (dcn_{name}="
                       f"{parts}); make {name} a multiple of {parts}")
  return dcn


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A `Mesh` with axes MESH_AXES (Auto axis types: XLA propagates shardings between constraints);
  over several slices a hybrid mesh: within each slice ICI-aware, across slices the DCN axes."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes(config, len(devices))
  pipeline_repeats(config)
  shape = tuple(sizes[name] for name in MESH_AXES)
  slices = num_slices(devices)
  if slices > 1:
    dcn = resolve_dcn_sizes(config, sizes, slices)
    dcn_shape = tuple(dcn[name] for name in MESH_AXES)
    ici_shape = tuple(sizes[name] // dcn[name] for name in MESH_AXES)
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                        allow_split_physical_axes=True)
    return jax.sharding.Mesh(device_array, MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement is optional; on hosts it cannot model keep process order.
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(device_array, MESH_AXES)
