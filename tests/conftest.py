"""Test-wide JAX setup: 8 emulated CPU devices, strict rank promotion, fast compiles.

XLA_FLAGS must be set before jax initialises its backends, hence at import.
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir",
                  str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
# Packages whose conftest trains one run for all their modules (session fixtures): kept whole on
# one pytest-xdist worker so the run is trained once.
WHOLE_PACKAGES = ("cli", "evaluate")


def pytest_collection_modifyitems(config, items):
  """Group tests for `pytest -n 2 --dist loadgroup` (pytest-xdist): a module stays on one worker
  (its module-scoped fixtures and compile caches are shared by its tests), and so does each package
  of WHOLE_PACKAGES. Without xdist the marks do nothing."""
  del config
  for item in items:
    relative = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS)
    whole = len(relative.parts) > 1 and relative.parts[0] in WHOLE_PACKAGES
    item.add_marker(pytest.mark.xdist_group(relative.parts[0] if whole else relative.as_posix()))
