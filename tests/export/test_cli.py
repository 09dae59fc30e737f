"""`glmjax export` from a checkpoint `glmjax train` wrote on an 8-device (fsdp x tensor) mesh, and
`glmjax import` of a transformers checkpoint into a workdir that `glmjax train` continues."""

import json
import os

import jax
import numpy as np
import torch
import transformers

from glmjax import cli
from glmjax.export import from_huggingface
from glmjax.run.load import load_params as load_checkpoint
from tests.export import helpers

MODULE = ["--module", "tests.export.tiny_task"]
TRAIN = [
    "--gin", "DataConfig.mixture='glmjax_export_tiny_task'",
    "--gin", "DataConfig.sequence_length=16", "--gin", "DataConfig.batch_size=8",
    "--gin", "MeshConfig.data=1", "--gin", "MeshConfig.fsdp=4", "--gin", "MeshConfig.tensor=2",
    "--gin", "TrainerConfig.progress_bar=False", "--gin", "TrainerConfig.plot=False",
    "--gin", "TrainerConfig.eval_at_end=False", "--gin", "OptimizerConfig.learning_rate=0.01",
]
MODEL = [  # LLaMA-style, every dim divisible by fsdp=4 / tensor=2
    "--gin", "ModelConfig.vocab_size=64", "--gin", "ModelConfig.d_model=32",
    "--gin", "ModelConfig.num_layers=2", "--gin", "ModelConfig.num_heads=4",
    "--gin", "ModelConfig.num_kv_heads=2", "--gin", "ModelConfig.head_dim=8",
    "--gin", "ModelConfig.ffn_dim=64", "--gin", "ModelConfig.max_length=32",
    "--gin", "ModelConfig.norm='rmsnorm'", "--gin", "ModelConfig.ffn='swiglu'",
    "--gin", "ModelConfig.position='rope'",
]


def test_export_from_a_checkpoint_trained_on_8_devices(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  assert cli.main(["train", *MODULE, *TRAIN, *MODEL, "--gin", "TrainerConfig.num_steps=3",
                   "--workdir", workdir]) == 0
  assert cli.main(["export", "--checkpoint", workdir, "--out", out, "--target", "native",
                   "--max_shard_size", "20KB"]) == 0
  loaded = load_checkpoint(workdir)
  assert loaded.step == 3 and len(loaded.mesh.devices.flat) == 8
  assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(loaded.params))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))

  tokens = helpers.random_tokens(64)
  diff = np.abs(helpers.jax_logits(loaded.params, loaded.config, tokens)
                - helpers.hf_logits(out, tokens)).max()
  assert diff <= helpers.TOLERANCE


def test_import_then_train_continues_from_the_imported_params(tmp_path):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
  model.save_pretrained(hf_dir)
  expected_params, expected_config = from_huggingface(hf_dir)

  assert cli.main(["import", "--from", hf_dir, "--out", workdir, *TRAIN]) == 0
  loaded = load_checkpoint(workdir)
  assert loaded.step == 0 and loaded.config == expected_config
  assert helpers.leaves_equal(jax.device_get(loaded.params), expected_params)

  assert cli.main(["train", *MODULE, *TRAIN, "--gin_file", os.path.join(workdir, "model.gin"),
                   "--gin", "TrainerConfig.num_steps=2", "--workdir", workdir]) == 0
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from"] == 0 and summary["step"] == 2
  trained = load_checkpoint(workdir)
  assert trained.step == 2
  assert not helpers.leaves_equal(jax.device_get(trained.params), expected_params)
  assert cli.main(["import", "--from", hf_dir, "--out", workdir]) == 2  # never over a checkpoint
