"""Opt-in: run the glmjax commands with glibc's malloc on transparent huge pages (Linux).

Why: XLA:CPU allocates one buffer for all of a step's temporaries at every
execution (1.15 GiB for the llama-small train step) and frees it after. The
allocation is far above glibc's mmap threshold (at most 32 MiB), so every step
maps it fresh and the kernel faults it in 4 KiB page by page: 294,000 minor
faults and ~0.5 CPU-seconds of kernel time per 2.7-second step on the
project's 2-core machine (BENCHMARKS.md, "Training throughput"). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc `madvise(MADV_HUGEPAGE)` its
mappings, so the same buffer arrives in 2 MiB pages: ~700 faults and 0.08
CPU-seconds per step, and the step ran ~1.12x faster with the process alone.

Why not by default: huge pages that are not free must be made by compaction
(the kernel's usual `defrag=madvise` does it synchronously, in the faulting
step). Next to another process that frees and re-faults memory between our
steps (the paired benchmark beside HF's step), half of the steps took 1.5x as
long, so the choice belongs to the user who knows the machine.

With GLMJAX_MALLOC_HUGEPAGES=1, `glmjax` (the console command) re-executes
itself once with the tunable added to GLIBC_TUNABLES (glibc reads it once,
when the dynamic loader starts the process, so it cannot be switched on from
inside Python). Nothing happens when the process is not Linux + glibc, when
the kernel's transparent huge pages are off ("[never]"), or when
GLIBC_TUNABLES already sets glibc.malloc.hugetlb (the user's own choice; the
re-executed process sees its own setting there, so it never loops). A script
of one's own gets the same with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python
script.py`.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_IN = "GLMJAX_MALLOC_HUGEPAGES"  # "1": on
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path: str = THP_ENABLED) -> bool:
  try:
    with open(path, encoding="ascii") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def environment_with_hugepages(environ: Mapping[str, str], *, system: Optional[str] = None,
                               libc: Optional[str] = None, thp: Optional[bool] = None) -> Optional[dict]:
  """With GLMJAX_MALLOC_HUGEPAGES=1: `environ` plus glibc.malloc.hugetlb=1 in GLIBC_TUNABLES
  (other tunables stay, ':'-joined); None when there is nothing to change (module docstring)."""
  system = platform.system() if system is None else system
  libc = platform.libc_ver()[0] if libc is None else libc
  if environ.get(OPT_IN, "0") != "1" or system != "Linux" or libc != "glibc":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":") if item):
    return None
  if not (_thp_available() if thp is None else thp):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  return env


def reexec_with_hugepages() -> None:
  """Replace this process by the same command line with huge-page malloc, when
  `environment_with_hugepages` has something to change; otherwise return."""
  env = environment_with_hugepages(os.environ)
  if env is None:
    return
  argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
