"""gin experiments: every file parses and binds; model files are the presets; typos and
meshes that do not fit fail before any compile with a clear message."""

import glob
import os

import pytest

from glmjax import config_gin
from glmjax.cli import common
from glmjax.cli import train as train_cli
from glmjax.model import presets
from glmjax.sharding import resolve_axis_sizes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "experiments", "**", "*.gin"),
                                                               recursive=True))
MODEL_FILE_PRESET = {
    "glm.gin": "glm-10b", "glm_large.gin": "glm-large", "glm130b.gin": "glm-130b", "chatglm.gin": "chatglm-6b",
    "chatglm2.gin": "chatglm2-6b", "llama.gin": "llama-7b", "llama2_7b.gin": "llama2-7b",
    "llama2_70b.gin": "llama2-70b", "llama_small.gin": "llama-small", "palm.gin": "palm-8b",
    "bloom.gin": "bloom-176b", "bloom_560m.gin": "bloom-560m", "gpt2.gin": "gpt2",
}


@pytest.fixture(autouse=True)
def clean_gin(monkeypatch):
  monkeypatch.chdir(REPO)
  config_gin.clear()
  yield
  config_gin.clear()


def parse(files=(), bindings=()):
  config_gin.parse(files, bindings, finalize=False)
  return config_gin.build_experiment()


def test_experiments_exist():
  assert "experiments/demo.gin" in GIN_FILES
  assert {os.path.basename(f) for f in GIN_FILES if f.startswith("experiments/models/")} == set(MODEL_FILE_PRESET)


# Experiments whose model comes from an imported run's model.gin (`glmjax train --gin_file
# EXPERIMENT --gin_file RUN/model.gin`): parsed here with a model file of the same family.
IMPORTED_MODEL = {"experiments/flan_smollm2.gin": "experiments/models/llama.gin"}


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses_and_binds(path):
  experiment = parse([path] + ([IMPORTED_MODEL[path]] if path in IMPORTED_MODEL else []))
  assert experiment.data.sequence_length <= experiment.model.max_length or path.startswith("experiments/data/")
  resolve_axis_sizes(experiment.mesh, 8)
  assert "ModelConfig." in config_gin.operative_config() or path.startswith("experiments/data/")


@pytest.mark.parametrize("name, preset", sorted(MODEL_FILE_PRESET.items()))
def test_model_files_are_the_presets(name, preset):
  assert parse([f"experiments/models/{name}"]).model == presets.get(preset)


def test_demo_is_a_tiny_glm_on_the_blank_infilling_mixture():
  experiment = parse(["experiments/demo.gin"])
  assert experiment.model.position == "learned_2d" and experiment.model.num_layers <= 4
  assert experiment.data.mixture == "glmjax_blank_infilling_default"
  assert experiment.model.vocab_size == 8192


def test_later_bindings_override_and_t5x_flags_work():
  rest, bindings = common.split_t5x_bindings(
      ["--gin_file", "experiments/demo.gin", "--gin.TrainerConfig.num_steps=7", "--gin.DataConfig.seed", "3"])
  assert rest == ["--gin_file", "experiments/demo.gin"]
  experiment = parse(["experiments/demo.gin"], bindings + ["OptimizerConfig.learning_rate = 1e-4"])
  assert experiment.trainer.num_steps == 7 and experiment.data.seed == 3
  assert experiment.optimizer.learning_rate == 1e-4


def no_compile(monkeypatch):
  """Makes any attempt to build the train program (and so compile) fail the test."""
  import glmjax.trainer.loop as loop

  def refuse(*args, **kwargs):
    raise AssertionError("reached the train program: the error was not caught before compiling")
  monkeypatch.setattr(loop, "TrainProgram", refuse)


@pytest.mark.parametrize("binding, needle", [
    ("ModelConfig.d_modle = 64", "Configurable 'ModelConfig' doesn't have a parameter named 'd_modle'"),
    ("ModelConfg.d_model = 64", "No configurable matching 'ModelConfg'"),
    ("ModelConfig.norm = 'batchnorm'", "ModelConfig.norm: 'batchnorm' is not one of"),
])
def test_typo_fails_fast_with_gins_message(monkeypatch, capsys, binding, needle):
  no_compile(monkeypatch)
  code = train_cli.main(["--gin_file", "experiments/demo.gin", "--gin", binding, "--workdir", "unused"])
  assert code == 2
  err = capsys.readouterr().err
  assert "configuration error" in err and needle in err


def test_mesh_that_does_not_fit_fails_with_a_clear_message(capsys, tmp_path):
  code = train_cli.main(["--gin_file", "experiments/demo.gin", "--gin", "MeshConfig.data = 3",
                         "--workdir", str(tmp_path)])
  assert code == 2
  assert "the axes multiply to 3 but there are 8 devices" in capsys.readouterr().err


def test_missing_experiment_file_is_reported(capsys):
  assert train_cli.main(["--gin_file", "experiments/nope.gin"]) == 2
  assert "experiments/nope.gin" in capsys.readouterr().err
