"""The command line's contract for a user's mistake: exit code 2 and exactly one line on stderr
naming the field, flag or file and the fix, before anything compiles (no traceback)."""

import os

import pytest

from tests.cli.conftest import run_cli, train_args
from tests.sharding.test_distributed import REPO

DEMO = os.path.join(REPO, "experiments", "demo.gin")


def no_compile(monkeypatch):
  """Any attempt to build a train program (and so to compile) fails the test."""
  import glmjax.trainer.loop as loop

  def refuse(*args, **kwargs):
    raise AssertionError("reached the train program: the error was not caught before compiling")
  monkeypatch.setattr(loop, "TrainProgram", refuse)


def no_evaluation(monkeypatch):
  import glmjax.evaluate.runner as runner

  def refuse(*args, **kwargs):
    raise AssertionError("the evaluation ran before the bad argument was reported")
  monkeypatch.setattr(runner, "evaluate", refuse)


def _tiny_hf_folder(path):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
  model.save_pretrained(str(path))
  return path


def _truncate(path, keep=0.5):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])


# Each case: (name, argv builder (tmp_path, trained_run) -> argv, substring of the one line,
# guard installed before running).
CASES = [
    ("prompt longer than the positions",
     lambda tmp, run: ["generate", "--checkpoint", run, "--prompt", "word " * 80],
     "ModelConfig.max_length=64", None),
    ("--mode blank without a mask",
     lambda tmp, run: ["generate", "--checkpoint", run, "--prompt", "no blank here", "--mode", "blank"],
     "--mode blank needs a [MASK]", None),
    ("--workdir that is a file",
     lambda tmp, run: train_args(_file(tmp / "a_file")),
     "is a file; give a folder", no_compile),
    ("num_steps='abc'",
     lambda tmp, run: train_args(tmp / "w", extra=["TrainerConfig.num_steps = 'abc'"]),
     "TrainerConfig.num_steps = 'abc' must be int", no_compile),
    ("gin syntax error",
     lambda tmp, run: train_args(tmp / "w", extra=["TrainerConfig.num_steps ="]),
     "gin syntax error", no_compile),
    ("train without --workdir",
     lambda tmp, run: ["train", "--gin_file", DEMO],
     "--workdir is required", no_compile),
    ("train --step that is not a checkpoint",
     lambda tmp, run: train_args(run, extra=[]) + ["--step", "3"],
     "--step 3 is not a checkpoint", None),
    ("eval --output into a missing folder",
     lambda tmp, run: ["eval", "--checkpoint", run, "--tasks", "glmjax_corpus_en_blank_infilling",
                       "--output", str(tmp / "missing" / "eval.json")],
     "does not exist; create it first", no_evaluation),
    ("empty checkpoint folder",
     lambda tmp, run: ["generate", "--checkpoint", _folder(tmp / "empty"), "--prompt", "hi"],
     "holds no checkpoint", None),
    ("missing checkpoint folder",
     lambda tmp, run: ["export", "--checkpoint", str(tmp / "nope"), "--out", str(tmp / "hf")],
     "does not exist", None),
    ("--step that is not a checkpoint",
     lambda tmp, run: ["generate", "--checkpoint", run, "--step", "3", "--prompt", "hi"],
     "--step 3 is not a checkpoint", None),
    ("export --max_shard_size typo",
     lambda tmp, run: ["export", "--checkpoint", run, "--out", str(tmp / "hf"), "--max_shard_size", "5XB"],
     "max_shard_size", None),
    ("import from a missing folder",
     lambda tmp, run: ["import", "--from", str(tmp / "nope"), "--out", str(tmp / "imported")],
     "is not a folder", None),
    ("import with a truncated config.json",
     lambda tmp, run: ["import", "--from", _damaged(tmp, "config.json"), "--out", str(tmp / "imported")],
     "config.json", None),
    ("import with a truncated safetensors file",
     lambda tmp, run: ["import", "--from", _damaged(tmp, "model.safetensors"), "--out", str(tmp / "imported")],
     "model.safetensors", None),
    ("import into a workdir holding a step",
     lambda tmp, run: ["import", "--from", str(_tiny_hf_folder(tmp / "hf")), "--out", run],
     "already holds a checkpoint", None),
]


def _file(path):
  path.write_text("not a folder")
  return path


def _folder(path):
  path.mkdir()
  return str(path)


def _damaged(tmp, name):
  folder = _tiny_hf_folder(tmp / "hf")
  _truncate(folder / name)
  return str(folder)


@pytest.mark.parametrize("name, argv, needle, guard", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, argv, needle, guard, trained_run, tmp_path, capsys,
                                          monkeypatch):
  del name
  if guard is not None:
    guard(monkeypatch)
  before = _snapshot(trained_run)
  args = argv(tmp_path, trained_run)
  capsys.readouterr()  # what building the case printed (transformers' save_pretrained)
  code = run_cli(args)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, err
  assert len(lines) == 1, err
  assert needle in lines[0] and lines[0].startswith("glmjax "), lines[0]
  assert _snapshot(trained_run) == before  # a refused command changes nothing on disk


def _snapshot(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def test_config_error_names_the_binding_even_with_many_lines_from_gin(capsys, monkeypatch, tmp_path):
  no_compile(monkeypatch)
  assert run_cli(train_args(tmp_path / "w", extra=["ModelConfg.d_model = 64"])) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "No configurable matching 'ModelConfg'" in err
  assert not os.path.exists(tmp_path / "w")
