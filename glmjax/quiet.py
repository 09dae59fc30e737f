"""Quiet by default: keep the terminal for glmjax's own output.

On a CPU box every glmjax command used to start with a screenful of
TensorFlow (the seqio input pipeline) and library chatter. Each line, where
it comes from, and what removes it (`quiet_runtime`):

  WARNING: All log messages before absl::InitializeLog() is called ...
  I... port.cc] oneDNN custom operations are on ...
  I... cudart_stub.cc] Could not find cuda drivers on your machine ...
      INFO lines from static initializers of two TensorFlow shared libraries
      (libtensorflow_framework via _pywrap_cpu_feature_guard, and
      _pywrap_profiler_plugin), each with its own absl log banner. They run
      before TensorFlow applies TF_CPP_MIN_LOG_LEVEL, so no level hides them
      (verified at 3). TF_ENABLE_ONEDNN_OPTS=0 drops the oneDNN line; the rest
      are filtered out of the C-level stderr while `import tensorflow` runs.
  I... cpu_feature_guard.cc] This TensorFlow binary is optimized ...
      INFO after logging is set up: TF_CPP_MIN_LOG_LEVEL=2.
  E... cuda_platform.cc] failed call to cuInit: INTERNAL: CUDA error ...
      TensorFlow probing for GPUs (an ERROR, so level 2 keeps it). Hiding the
      GPUs from TensorFlow (`tf.config.set_visible_devices([], "GPU")`, which
      glmjax.tasks does anyway: JAX owns the accelerators) right after the
      import, under the same stderr filter, makes the probe happen there.
  E... util.cc] oneDNN supports DT_INT64 only on platforms with AVX-512 ...
      a tf.data thread; gone with TF_ENABLE_ONEDNN_OPTS=0 (oneDNN kernels
      only matter for float math, which the input pipeline barely does;
      JAX does not read the variable).
  WARNING:absl:Using an uncached FunctionDataset for training ...
      seqio, for every shuffled FunctionDataSource. Fixed at the source:
      glmjax's record sources shuffle a full index (glmjax.tasks.sources), so
      they say so instead of inheriting the warning; a user's own
      FunctionDataSource still gets it.
  normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty ...
      the SentencePiece copy inside tensorflow-text, from a tf.data thread,
      for any identity-normalized model. Fixed at the source: the TF
      tokenizer of GLMVocabulary gets a charsmap that matches nothing
      (glmjax.tasks.vocab), which normalizes identically.

This module imports neither JAX nor TensorFlow, so the CLI can call
`quiet_runtime` before either loads.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Iterator, Sequence

# Substrings of the stderr lines dropped while TensorFlow is imported; other lines are kept.
TF_IMPORT_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
)

QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow / XLA C++ logs: errors only
    "TF_ENABLE_ONEDNN_OPTS": "0",  # no oneDNN notices from TensorFlow's (input pipeline) kernels
}


def quiet_runtime(verbose: bool = False) -> None:
  """Makes TensorFlow and the libraries around it quiet; call before JAX or TensorFlow is imported.

  `verbose=True` changes nothing that hides output and turns absl / Python
  logging up to INFO, for debugging. Environment variables the user set
  already win either way.
  """
  if verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    _log_info()
    return
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
  if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlow())


def _log_info() -> None:
  logging.basicConfig(level=logging.INFO)
  logging.getLogger().setLevel(logging.INFO)
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)


def drop_lines(text: bytes, noise: Sequence[str]) -> bytes:
  """`text` without the lines that contain any of `noise`."""
  keys = [n.encode() for n in noise]
  return b"".join(line for line in text.splitlines(keepends=True) if not any(k in line for k in keys))


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str]) -> Iterator[None]:
  """Captures file descriptor 2 (C++ and Python writes alike) and writes back all but `noise`.

  C++ libraries write to the descriptor, not to sys.stderr, so only a
  descriptor-level capture reaches them. Whatever else was written in the
  block (a traceback, a real error) comes out after it.
  """
  _flush_stderr()
  try:
    saved = os.dup(2)
  except OSError:  # no stderr to filter
    yield
    return
  try:
    with tempfile.TemporaryFile() as capture:
      os.dup2(capture.fileno(), 2)
      try:
        yield
      finally:
        _flush_stderr()
        os.dup2(saved, 2)
        capture.seek(0)
        kept = drop_lines(capture.read(), noise)
        if kept:
          os.write(2, kept)
  finally:
    os.close(saved)


def _flush_stderr() -> None:
  if sys.stderr is not None:
    sys.stderr.flush()


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` on its first import and loads it with the import-time noise filtered.

  It steps aside (leaves sys.meta_path) once TensorFlow is really imported and
  hands the real loader back to the module, so TensorFlow is imported as usual,
  only quieter. A bare lookup (`importlib.util.find_spec("tensorflow")`, as
  transformers' `is_tf_available` does) leaves it in place.
  """

  def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
    if fullname != "tensorflow":
      return None
    index = sys.meta_path.index(self) if self in sys.meta_path else None
    if index is not None:
      sys.meta_path.remove(self)  # the real finders locate the package
    try:
      spec = importlib.util.find_spec(fullname)
    finally:
      if index is not None:
        sys.meta_path.insert(index, self)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader, self)
    return spec


class _QuietLoader(importlib.abc.Loader):
  def __init__(self, loader, finder=None):
    self._loader = loader
    self._finder = finder

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    if self._finder in sys.meta_path:
      sys.meta_path.remove(self._finder)
    module.__loader__ = self._loader
    if module.__spec__ is not None:
      module.__spec__.loader = self._loader
    with filtered_stderr(TF_IMPORT_NOISE):
      self._loader.exec_module(module)
      # JAX owns the accelerators; probing them here (cuInit) keeps the probe's errors in the filter.
      module.config.set_visible_devices([], "GPU")

  def __getattr__(self, name):
    return getattr(self._loader, name)
