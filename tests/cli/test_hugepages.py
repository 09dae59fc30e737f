"""With GLMJAX_MALLOC_HUGEPAGES=1 the console command re-executes itself once with huge-page
malloc (glmjax.hugepages); without it, nothing changes."""

import os
import subprocess
import sys
import textwrap

from glmjax import hugepages

LINUX = dict(system="Linux", libc="glibc", thp=True)


ON = {"GLMJAX_MALLOC_HUGEPAGES": "1"}


def test_adds_the_tunable_and_keeps_the_users_others():
  assert hugepages.environment_with_hugepages(dict(ON, A="1"), **LINUX) == dict(
      ON, A="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  env = hugepages.environment_with_hugepages(dict(ON, GLIBC_TUNABLES="glibc.malloc.arena_max=2"), **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_changes_nothing_where_it_should_not():
  cases = [
      ({}, LINUX),  # off unless asked for
      ({"GLMJAX_MALLOC_HUGEPAGES": "0"}, LINUX),
      (dict(ON, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), LINUX),  # the user's own (also: no loop)
      (dict(ON, GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"), LINUX),
      (ON, dict(LINUX, system="Darwin")),
      (ON, dict(LINUX, libc="")),  # musl and others ignore GLIBC_TUNABLES
      (ON, dict(LINUX, thp=False)),
  ]
  for environ, where in cases:
    assert hugepages.environment_with_hugepages(environ, **where) is None, (environ, where)


def test_reads_the_kernels_setting(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages._thp_available(str(path))  # pylint: disable=protected-access
  path.write_text("always madvise [never]\n")
  assert not hugepages._thp_available(str(path))  # pylint: disable=protected-access
  assert not hugepages._thp_available(str(tmp_path / "missing"))  # pylint: disable=protected-access


# The child prints its GLIBC_TUNABLES, then runs the console entry point as the `glmjax` script
# does (argv None). After the re-exec the same code runs again: a second line, with the tunable,
# and a 64 MiB buffer malloc'd by numpy is backed by huge pages (smaps' AnonHugePages).
CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    buf = np.ones(64 << 18, np.float32)  # 64 MiB through malloc, every page touched
    huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup")
               if line.startswith("AnonHugePages:")) if os.path.exists("/proc/self/smaps_rollup") else -1
    print("TUNABLES", os.environ.get("GLIBC_TUNABLES"), "HUGE_KB", huge, flush=True)
    sys.argv = ["glmjax", "tokenizer", "--help"]
    from glmjax.cli import main
    main()
""")


def test_console_entry_reexecutes_once_with_huge_pages():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(ON)
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  lines = [line.split() for line in out.splitlines() if line.startswith("TUNABLES")]
  if hugepages.environment_with_hugepages(env) is None:  # not Linux + glibc + THP: runs as it is
    assert [line[1] for line in lines] == ["None"]
    return
  assert [line[1] for line in lines] == ["None", "glibc.malloc.hugetlb=1"], out
  assert int(lines[1][3]) >= 2048, out  # at least one 2 MiB page under the 64 MiB buffer
  assert "usage" in out.lower()


def test_off_by_default_and_never_from_python():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GLMJAX_MALLOC_HUGEPAGES")}
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert [line.split()[1] for line in out.splitlines() if line.startswith("TUNABLES")] == ["None"], out


def test_called_from_python_it_never_reexecutes():
  child = ("from glmjax.cli import main\n"
           "try:\n  main(['tokenizer', '--help'])\nexcept SystemExit:\n  pass\nprint('RAN')")
  env = dict({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **ON)
  out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.count("RAN") == 1  # a re-exec would have run the code a second time
