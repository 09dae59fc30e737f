"""P-Tuning v2 end to end: selected from gin and trained by `glmjax train`
(experiments/ptuning_llama_small.gin, shrunk): the prefix moves, the base stays the base run's bit
for bit, checkpoints hold the prefix only, resume is exact; greedy decoding with the KV cache and
the prefix equals greedy decoding by full forwards over prefixed rows (ChatGLM2 ptuning: the
prefix as initial past_key_values, positions unchanged); bad combinations exit 2 in one line."""

import contextlib
import os

import jax
import numpy as np
import pytest

from glmjax.generate import GenerationOptions, generate
from glmjax.run import load as load_lib
from glmjax.run.directory import Workdir
from glmjax.tuning import prefix as prefix_lib
from glmjax.tuning.prefix import PrefixConfig
from tests.export.helpers import perturbed_params
from tests.train.helpers import tiny_model
from tests.tuning.helpers import greedy_by_full_forward
from tests.tuning.test_lora_train import REPO, _losses, _saved_param_paths, run

P = 3
STEPS = 4
CONFIG = tiny_model()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ptuning")
  paths = {name: str(root / name) for name in ("base", "straight", "resumed")}
  with contextlib.chdir(REPO):
    assert run("experiments/llama_small_causal_lm.gin", paths["base"], 1) == 0
    extra = [f"PrefixConfig.base_checkpoint = '{paths['base']}'", f"PrefixConfig.pre_seq_len = {P}",
             "DataConfig.sequence_length = 24"]
    assert run("experiments/ptuning_llama_small.gin", paths["straight"], STEPS, extra) == 0
    assert run("experiments/ptuning_llama_small.gin", paths["resumed"], STEPS // 2, extra) == 0
    assert run("experiments/ptuning_llama_small.gin", paths["resumed"], STEPS, extra) == 0
    yield paths


def _restore(workdir, step):
  experiment = load_lib.run_experiment(Workdir(workdir), step)
  mesh_config = load_lib.inference_mesh_config(experiment.mesh, 1)
  from glmjax import sharding as shd
  mesh = shd.make_mesh(mesh_config, jax.devices()[:1])
  rules = shd.normalise_rules(mesh_config.rules)
  return experiment, prefix_lib.restore_prefix_params(Workdir(workdir).checkpoints, step, experiment,
                                                     mesh, rules)


def test_ptuning_run_trains_the_prefix_only_and_resumes_exactly(runs):
  losses = _losses(runs["straight"])
  assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
  assert _losses(runs["resumed"]) == losses  # resume is exact
  saved = _saved_param_paths(runs["straight"], STEPS)
  assert sorted(saved) == ["layers/attn/prefix_k", "layers/attn/prefix_v"], saved
  info = Workdir(runs["straight"]).run_info(STEPS)
  assert "PrefixConfig.pre_seq_len = 3" in info["gin"]
  experiment, params = _restore(runs["straight"], STEPS)
  assert params["layers"]["attn"]["prefix_k"].shape == (2, P, 2, 16)
  base = load_lib.load_params(runs["base"], devices=jax.devices()[:1]).params
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                               jax.tree_util.tree_flatten_with_path(
                                   {**params, "layers": {**params["layers"], "attn": {
                                       k: v for k, v in params["layers"]["attn"].items()
                                       if k not in prefix_lib.PREFIX_NAMES}}})[0]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  _, resumed = _restore(runs["resumed"], STEPS)
  np.testing.assert_array_equal(np.asarray(resumed["layers"]["attn"]["prefix_k"]),
                                np.asarray(params["layers"]["attn"]["prefix_k"]))
  init = prefix_lib.PrefixTuning(experiment.model, experiment.prefix).init_params(
      jax.random.PRNGKey(experiment.trainer.seed))
  assert np.abs(np.asarray(init["layers"]["attn"]["prefix_k"])
                - np.asarray(params["layers"]["attn"]["prefix_k"])).max() > 1e-3  # it trained


@pytest.mark.parametrize("bad, message", [
    (["PrefixConfig.pre_seq_len = 2", "DataConfig.pack = True"], "set DataConfig.pack = False"),
    (["PrefixConfig.pre_seq_len = 2", "LoraConfig.rank = 2"], "pick one method"),
    (["PrefixConfig.pre_seq_len = -1"], "PrefixConfig.pre_seq_len=-1 must be an int >= 0"),
])
def test_bad_prefix_options_exit_2_in_one_line(tmp_path, capsys, bad, message):
  with contextlib.chdir(REPO):
    code = run("experiments/ptuning_llama_small.gin", str(tmp_path / "run"), 1, bad)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-chatglm2"])
def test_greedy_decode_with_cache_equals_full_forward_with_prefix(preset):
  import dataclasses
  from glmjax.model import presets
  config = CONFIG if preset == "tiny-llama" else dataclasses.replace(
      presets.get(preset), vocab_size=CONFIG.vocab_size, max_length=64)
  base = perturbed_params(config, seed=2, scale=0.3)
  params = prefix_lib.apply_prefix(base, config, PrefixConfig(pre_seq_len=P, init_std=1.0),
                                   jax.random.PRNGKey(1))
  prompts = [[5, 9, 3, 7, 2], [11, 4]]  # different lengths: left padding between prefix and prompt
  options = GenerationOptions(strategy="greedy", max_new_tokens=6, stop_ids=())
  ours = generate(params, config, prompts, options).sequences()
  assert ours == greedy_by_full_forward(params, config, prompts, 6, P)
  assert ours != generate(base, config, prompts, options).sequences()  # the prefix matters


def test_cli_generate_decodes_a_ptuning_run_and_eval_export_refuse_it(runs, capsys, tmp_path):
  """run.load gives generate the base + the checkpoint's prefix; eval and export, whose full
  forwards would overwrite a row's first positions with the prefix, exit 2 in one line."""
  from glmjax import cli
  loaded = load_lib.load_params(runs["straight"])
  assert loaded.step == STEPS and "prefix_k" in loaded.params["layers"]["attn"]
  _, want = _restore(runs["straight"], STEPS)
  np.testing.assert_array_equal(np.asarray(loaded.params["layers"]["attn"]["prefix_k"]),
                                np.asarray(want["layers"]["attn"]["prefix_k"]))
  assert cli.main(["generate", "--checkpoint", runs["straight"], "--prompt", "To be", "--strategy", "greedy",
                   "--max_new_tokens", "4"]) == 0
  capsys.readouterr()
  for argv in (["eval", "--checkpoint", runs["straight"], "--tasks", "glmjax_corpus_en_causal_lm"],
               ["export", "--checkpoint", runs["straight"], "--out", str(tmp_path / "hf")]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "P-Tuning v2 run" in err[0], err
