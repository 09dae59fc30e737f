"""Keep an installed-but-idle `libtpu` out of CPU hosts' way.

`libtpu` is installed for `glmjax compile` (ahead-of-time compiles for TPU
topologies from any host). With it installed, JAX's default backend search
(JAX_PLATFORMS unset) loads and initialises libtpu on the first device query,
even on a machine with no TPU: five lines of stderr ("Failed to find host
bounds ...", "unexpected worker hostname ..."), a fraction of a second, and
an exclusive lock on /tmp/libtpu_lockfile that makes a second such process
fail to load libtpu. `skip_absent_tpu` pins the CPU backend on exactly that
kind of machine, so every command runs as without libtpu; `glmjax compile`
still reaches libtpu through `jax.experimental.topologies`, which loads it
by path whatever the platform setting.

Nothing changes when the user chose platforms (JAX_PLATFORMS / jax_platforms),
when libtpu is not installed, when a TPU is attached, or when an NVIDIA GPU
is visible (the CUDA backend must stay selectable). The probes read /sys and
/dev only (no JAX import), as JAX's own `hardware_utils` does.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (v2-v6) on the PCI bus
NVIDIA_PCI_VENDOR = "0x10de"


def _pci_vendor_present(vendor: str) -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path, encoding="ascii") as f:
        if f.read().strip() == vendor:
          return True
    except OSError:
      continue
  return False


def tpu_attached() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or _pci_vendor_present(
      GOOGLE_PCI_VENDOR)


def nvidia_gpu_visible() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*")) or _pci_vendor_present(NVIDIA_PCI_VENDOR)


def should_skip_tpu() -> bool:
  """libtpu installed, no platform chosen, and no accelerator it or CUDA could use here."""
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME"):
    return False
  jax = sys.modules.get("jax")  # None too where a caller blocks the import (torch-only use)
  if jax is not None and jax.config.jax_platforms:
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False
  return not tpu_attached() and not nvidia_gpu_visible()


def skip_absent_tpu() -> bool:
  """Pins JAX to CPU when libtpu is installed but useless here; True when it did.

  Before `import jax` it sets JAX_PLATFORMS=cpu; after, `jax_platforms` (if no backend is up yet:
  a running backend is left alone). `import glmjax` runs it.
  """
  if not should_skip_tpu():
    return False
  if sys.modules.get("jax") is None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
