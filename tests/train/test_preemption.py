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


def start(workdir, *args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m", "tests.train.preemption_worker", workdir,
                           *map(str, args)], cwd=REPO, env=env,
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


def _last_train_step(metrics):
  if not os.path.exists(metrics):
    return 0
  lines = [l for l in open(metrics, encoding="utf-8").read().splitlines() if l.strip()]
  return json.loads(lines[-1])["step"] if lines else 0


def test_ctrl_c_saves_past_the_last_periodic_save_and_resumes_exactly(tmp_path):
  """SIGINT behaves like SIGTERM (save at the step boundary, exit 130 from the CLI's view: status
  'interrupted'); the resumed run ends with the same params as a run never interrupted."""
  workdir, reference = str(tmp_path / "run"), str(tmp_path / "reference")
  total = 40
  first = start(workdir, total, 1000)  # no periodic save before the end
  try:
    wait_for(lambda: _last_train_step(os.path.join(workdir, "metrics.jsonl")) >= 3, "3 steps", first)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=TIMEOUT_S)
  finally:
    first.kill()
  assert first.returncode == 0, out[-3000:]
  assert "Traceback" not in out and "SIGINT: saved a checkpoint at step" in out
  stopped = int(out.split("STATUS interrupted ")[1].split()[0])
  saved = committed_steps(os.path.join(workdir, "checkpoints"))
  assert 3 <= stopped < total and max(saved) == stopped  # saved at the step it stopped, not before
  assert stopped - 1 not in saved

  env = dict(os.environ, PYTHONPATH=REPO)
  runs = [subprocess.Popen([sys.executable, "-m", "tests.train.preemption_worker", path, str(total), "1000"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for path in (workdir, reference)]  # resumed and never-interrupted, side by side
  resumed, fresh = (_output(p) for p in runs)
  assert f"STATUS completed {total}" in resumed, resumed[-3000:]
  assert f"STATUS completed {total}" in fresh, fresh[-3000:]
  params = lambda text: text.split("PARAMS ")[1].split()[0]  # noqa: E731
  assert params(resumed) == params(fresh)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    assert json.load(f)["resumed_from"] == stopped


def _output(proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    proc.kill()
  return out
