"""SIGKILL in the middle of a save, then SIGTERM: the run resumes from the last complete
checkpoint, and preemption saves a final checkpoint and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.sharding.test_distributed import REPO

TIMEOUT_S = 240


def committed_steps(ckpt_dir):
  """orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when complete."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def temporary_dirs(ckpt_dir):
  return [n for n in os.listdir(ckpt_dir) if "tmp" in n] if os.path.isdir(ckpt_dir) else []


def wait_for(predicate, what, proc):
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"worker exited early ({proc.returncode}) waiting for {what}:\n"
                           + proc.stdout.read()[-3000:])
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def start(workdir):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m", "tests.train.preemption_worker", workdir], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_save_resumes_from_last_complete_checkpoint_and_sigterm_saves(tmp_path):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")

  first = start(workdir)
  try:
    while True:  # freeze the worker while a save is provably in flight, then kill it
      wait_for(lambda: len(committed_steps(ckpt_dir)) >= 2 and temporary_dirs(ckpt_dir), "a save in flight",
               first)
      first.send_signal(signal.SIGSTOP)
      if temporary_dirs(ckpt_dir):
        break
      first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
  finally:
    first.kill()
  partial = temporary_dirs(ckpt_dir)
  complete = committed_steps(ckpt_dir)
  assert partial and complete

  second = start(workdir)
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    resumed_past = lambda: os.path.exists(metrics) and any(  # noqa: E731
        json.loads(l)["step"] > max(complete) + 2 for l in open(metrics, encoding="utf-8").read().splitlines()[-3:]
        if l.strip())
    wait_for(resumed_past, "progress after resuming", second)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=TIMEOUT_S)
  finally:
    second.kill()
  assert second.returncode == 0, out[-3000:]
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["status"] == "preempted"
  assert summary["resumed_from"] == max(complete)  # the partial save was never taken as a step
  assert f"STATUS preempted {summary['step']}" in out
  final = committed_steps(ckpt_dir)
  assert max(final) == summary["step"]  # SIGTERM saved the step it stopped at
  assert not temporary_dirs(ckpt_dir)
