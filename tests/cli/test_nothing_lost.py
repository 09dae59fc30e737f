"""Nothing written is ever lost: refused or failed commands leave every earlier file byte-identical,
and a damaged newest checkpoint is set aside (not deleted) while training resumes from the one before."""

import gc
import json
import os

import pytest

from tests.cli.conftest import STEPS, run_cli, train_args
from tests.cli.test_bad_input import _snapshot, _tiny_hf_folder


# orbax leaves its per-array read coroutines unawaited when a damaged file aborts a restore; the
# interpreter reports each as an unraisable exception at garbage collection, which these tests
# run before they end so the report lands inside them.
DAMAGED_RESTORE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_export_refuses_a_folder_of_someone_elses_files(trained_run, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "config.json").write_text('{"my": "own config"}')
  (out / "model.safetensors").write_bytes(b"not yours")
  before = _snapshot(out)
  assert run_cli(["export", "--checkpoint", trained_run, "--out", str(out)]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert _snapshot(out) == before


def test_failed_re_export_leaves_the_earlier_export_byte_identical(trained_run, tmp_path):
  out = tmp_path / "hf"
  assert run_cli(["export", "--checkpoint", trained_run, "--out", str(out), "--step", "2"]) == 0
  before = _snapshot(out)
  assert run_cli(["export", "--checkpoint", trained_run, "--out", str(out),
                  "--max_shard_size", "5XB"]) == 2
  assert _snapshot(out) == before
  # a re-export into glmjax's own earlier export replaces it whole
  assert run_cli(["export", "--checkpoint", trained_run, "--out", str(out)]) == 0
  assert _snapshot(out) != before
  assert not [n for n in os.listdir(tmp_path) if "tmp" in n]


def test_refused_import_leaves_model_gin_byte_identical(tmp_path):
  hf = _tiny_hf_folder(tmp_path / "hf")
  out = tmp_path / "imported"
  assert run_cli(["import", "--from", str(hf), "--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == ["checkpoints", "model.gin"]
  before = _snapshot(out)
  assert run_cli(["import", "--from", str(hf), "--out", str(out), "--param_dtype", "bfloat16"]) == 2
  assert _snapshot(out) == before
  assert sorted(os.listdir(tmp_path)) == ["hf", "imported"]  # no temporary folder left


def test_refused_resume_leaves_config_gin_byte_identical(run_copy, capsys):
  before = _snapshot(run_copy)
  code = run_cli(train_args(run_copy, steps=STEPS + 2, extra=["ModelConfig.ffn_dim = 96"]))
  assert code == 2
  assert "does not match this config's shapes" in capsys.readouterr().err
  assert _snapshot(run_copy) == before


def _largest_file(folder):
  files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
  return max(files, key=os.path.getsize)


@DAMAGED_RESTORE
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(run_copy, capsys):
  newest = os.path.join(run_copy, "checkpoints", str(STEPS))
  victim = _largest_file(os.path.join(newest, "state"))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  damaged = open(victim, "rb").read()

  assert run_cli(train_args(run_copy, steps=STEPS + 1)) == 0
  err = [line for line in capsys.readouterr().err.splitlines() if "checkpoint step" in line]
  assert len(err) == 1 and f"checkpoint step {STEPS} is unreadable" in err[0], err
  assert f"resuming from step {STEPS - 2}" in err[0]
  with open(os.path.join(run_copy, "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from"] == STEPS - 2 and summary["step"] == STEPS + 1
  skipped = os.path.join(run_copy, "skipped_checkpoints")
  (moved,) = os.listdir(skipped)
  assert moved.startswith(f"{STEPS}-")
  kept = os.path.join(skipped, moved, os.path.relpath(victim, newest))
  assert open(kept, "rb").read() == damaged  # set aside as it was, never deleted
  steps = sorted(int(n) for n in os.listdir(os.path.join(run_copy, "checkpoints")) if n.isdigit())
  assert steps[-3:] == [STEPS - 2, STEPS, STEPS + 1]  # saves every 2 steps and at the end

  records = [json.loads(l) for l in open(os.path.join(run_copy, "metrics.jsonl")) if l.strip()]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == sorted(set(train_steps)) == list(range(1, STEPS + 2))  # replayed steps once
  gc.collect()


@DAMAGED_RESTORE
def test_generate_skips_an_unreadable_newest_step_and_says_so(run_copy, capsys):
  state = os.path.join(run_copy, "checkpoints", str(STEPS), "state")
  for root, _, names in os.walk(state):  # every array chunk of the step, params included
    if os.path.relpath(root, state).startswith(("d", "ocdbt")):
      for name in names:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(16)
  assert run_cli(["generate", "--checkpoint", run_copy, "--prompt", "To be [MASK]",
                  "--max_new_tokens", "2", "--no_stream"]) == 0
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and f"skipping unreadable checkpoint step {STEPS}" in err[0]
  assert run_cli(["generate", "--checkpoint", run_copy, "--step", str(STEPS), "--prompt", "x"]) == 2
  gc.collect()


def test_train_from_an_older_step_sets_newer_ones_aside(run_copy, capsys):
  assert run_cli(train_args(run_copy, steps=STEPS - 1) + ["--step", str(STEPS - 2)]) == 0
  err = capsys.readouterr().err
  assert f"checkpoint step {STEPS} is newer than --step {STEPS - 2}: resuming from step {STEPS - 2}" in err
  assert os.listdir(os.path.join(run_copy, "skipped_checkpoints"))[0].startswith(f"{STEPS}-")
