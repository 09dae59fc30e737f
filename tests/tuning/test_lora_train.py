"""LoRA driven by `glmjax train` (experiments/lora_llama_small.gin, shrunk): checkpoints hold the
adapters and optimizer state only and name the base run; resume is exact; the base stays the
base run's bit for bit; params-only load (generate / eval / export) gets the merged weights."""

import contextlib
import functools
import os

import jax
import numpy as np
import pytest

from glmjax.model import forward
from glmjax.run import load as load_lib
from glmjax.trainer.metrics import read_jsonl
from glmjax.tuning import lora as lora_lib
from tests.train.test_gin import REPO
from tests.tuning.helpers import cli_train

SHRINK = ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 2",
          "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 16", "ModelConfig.ffn_dim = 64",
          "ModelConfig.max_length = 32", "DataConfig.sequence_length = 32", "DataConfig.batch_size = 8",
          "TrainerConfig.eval_every = 0", "TrainerConfig.eval_at_end = False",
          "TrainerConfig.peak_flops_per_device = 1e9", "TrainerConfig.progress_bar = False",
          "TrainerConfig.plot = False", "OptimizerConfig.warmup_steps = 0",
          "OptimizerConfig.learning_rate = 1e-2", "CheckpointConfig.save_every = 2",
          "CheckpointConfig.async_save = False", "MeshConfig.data = 2", "MeshConfig.fsdp = -1"]
STEPS = 4


run = functools.partial(cli_train, shrink=SHRINK)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  paths = {name: str(root / name) for name in ("base", "straight", "resumed", "qlora", "dpo")}
  with contextlib.chdir(REPO):
    assert run("experiments/llama_small_causal_lm.gin", paths["base"], 1) == 0
    lora = [f"LoraConfig.base_checkpoint = '{paths['base']}'", "LoraConfig.rank = 4"]
    assert run("experiments/lora_llama_small.gin", paths["straight"], STEPS, lora) == 0
    assert run("experiments/lora_llama_small.gin", paths["resumed"], STEPS // 2, lora) == 0
    assert run("experiments/lora_llama_small.gin", paths["resumed"], STEPS, lora) == 0
    assert run("experiments/qlora_llama_small.gin", paths["qlora"], 2, lora) == 0
    assert run("experiments/dpo_llama_small.gin", paths["dpo"], 3, lora + ["DpoConfig.beta = 0.5"]) == 0
    yield paths


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["kind"] == "train"}


def _saved_param_paths(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(os.path.join(workdir, "checkpoints", str(step), "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def test_checkpoint_holds_adapters_and_names_the_base(runs):
  paths = _saved_param_paths(runs["straight"], STEPS)
  assert paths and all(p.endswith(("/a", "/b")) for p in paths), paths
  assert len(paths) == 2 * 7  # every projection of the 'all' target, stacked over layers
  info = load_lib.Workdir(runs["straight"]).run_info(STEPS)
  gin_text = info["gin"].replace("\\\n", " ")  # gin wraps long lines with a backslash
  gin_text = " ".join(gin_text.split())
  assert f"LoraConfig.base_checkpoint = '{runs['base']}'" in gin_text


def test_resume_is_exact(runs):
  straight, resumed = _losses(runs["straight"]), _losses(runs["resumed"])
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert [resumed[s] for s in sorted(resumed)] == [straight[s] for s in sorted(straight)]


def test_loaded_run_is_the_base_with_the_adapters_merged(runs):
  base = load_lib.load_params(runs["base"])
  loaded = load_lib.load_params(runs["straight"])
  experiment = loaded.experiment
  adapted = lora_lib.restore_lora_params(loaded.workdir.checkpoints, STEPS, experiment, loaded.mesh,
                                         loaded.rules)
  wrapped = [leaf for leaf in jax.tree.leaves(adapted, is_leaf=lora_lib.is_lora) if lora_lib.is_lora(leaf)]
  assert len(wrapped) == 7 and all(np.any(np.asarray(leaf.b) != 0) for leaf in wrapped)
  # the base inside the LoRA tree is the base run's, bit for bit
  for group, name in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_down")):
    np.testing.assert_array_equal(np.asarray(adapted["layers"][group][name].base),
                                  np.asarray(base.params["layers"][group][name]))
  np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]),
                                np.asarray(base.params["embed"]["embedding"]))
  tokens = np.arange(2, 34, dtype=np.int32).reshape(2, 16)
  batch = {"tokens": tokens}
  np.testing.assert_allclose(np.asarray(forward(loaded.params, batch, experiment.model)),
                             np.asarray(forward(adapted, batch, experiment.model)), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(forward(loaded.params, batch, experiment.model))
                - np.asarray(forward(base.params, batch, experiment.model))).max() > 1e-4


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_generate_runs_on_the_lora_run_with_quantized_weights(runs, quantize, capsys):
  from glmjax.cli import generate as generate_cli
  code = generate_cli.main(["--checkpoint", runs["straight"], "--prompt", "To be, or not",
                            "--strategy", "greedy", "--max_new_tokens", "4", "--no_stream",
                            "--quantize", quantize])
  out = capsys.readouterr().out
  assert code == 0 and out.startswith("### To be, or not"), out


def test_qlora_run_saves_adapters_only_and_loads_merged(runs):
  paths = _saved_param_paths(runs["qlora"], 2)
  assert len(paths) == 2 * 7 and all(p.endswith(("/a", "/b")) for p in paths), paths
  losses = _losses(runs["qlora"])
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  loaded = load_lib.load_params(runs["qlora"])
  assert loaded.experiment.lora.quantize == "nf4"
  from glmjax.tuning import quant
  base = load_lib.load_params(runs["base"])
  adapted = lora_lib.restore_lora_params(loaded.workdir.checkpoints, 2, loaded.experiment, loaded.mesh,
                                         loaded.rules)
  wq = adapted["layers"]["attn"]["wq"]
  assert quant.is_quantized(wq.base)  # the base is re-quantized from the base run, not stored
  float_wq = np.asarray(base.params["layers"]["attn"]["wq"])
  # NF4 error: at most half the widest level gap (0.139) of a block absmax
  assert np.abs(np.asarray(wq.base.dense()) - float_wq).max() <= 0.15 * np.abs(float_wq).max()
  np.testing.assert_allclose(np.asarray(loaded.params["layers"]["attn"]["wq"]), np.asarray(wq.dense()),
                             atol=1e-6)


def test_dpo_run_reports_preference_metrics_from_log_2(runs):
  records = [r for r in read_jsonl(os.path.join(runs["dpo"], "metrics.jsonl")) if r["kind"] == "train"]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # B = 0: policy = reference
  assert records[0]["rewards_margin"] == 0.0
  assert all(k in records[-1] for k in ("rewards_chosen", "rewards_rejected", "preference_accuracy"))
  assert records[-1]["loss"] != records[0]["loss"]
  paths = _saved_param_paths(runs["dpo"], 3)
  assert len(paths) == 2 * 7 and all(p.endswith(("/a", "/b")) for p in paths)
