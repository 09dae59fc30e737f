"""Keep an installed-but-idle `libtpu` out of CPU hosts' way.

`libtpu` is installed for `glmjax compile` (ahead-of-time compiles for TPU
topologies from any host). With it installed, JAX's default backend search
(JAX_PLATFORMS unset) loads and initialises libtpu on every first device
query, even on a machine with no TPU: ~0.3 s and five lines of stderr
("Failed to find host bounds ...", "unexpected worker hostname ...").
`skip_absent_tpu` pins the CPU backend on exactly that kind of machine, so
every command runs as without libtpu; `glmjax compile` still reaches libtpu
through `jax.experimental.topologies`, which loads it by path whatever the
platform setting.

Nothing changes when the user chose platforms (JAX_PLATFORMS / jax_platforms),
when libtpu is not installed, when TPU chips are present, or when an NVIDIA GPU
is visible (the CUDA backend must stay selectable).
"""

from __future__ import annotations

import importlib.util

import jax
from jax._src import hardware_utils  # chip probes that JAX itself runs at import


def should_skip_tpu() -> bool:
  if jax.config.jax_platforms:
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return False
  return not hardware_utils.has_visible_nvidia_gpu()


def skip_absent_tpu() -> bool:
  """Pins jax_platforms='cpu' when libtpu is installed but useless here; True when it did.

  Must run before JAX initialises its backends (glmjax.sharding runs it at import; every glmjax
  module that touches devices imports glmjax.sharding first).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized() or not should_skip_tpu():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
