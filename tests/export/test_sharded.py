"""Export from params sharded over 8 emulated devices, sharded safetensors files, bfloat16."""

import dataclasses
import json
import math
import os

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.export import exporter, from_huggingface, safetensors_io, to_huggingface
from glmjax.model import ModelConfig
from tests.export import helpers

CONFIG = ModelConfig(vocab_size=100, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2,
                     head_dim=8, ffn_dim=64, max_length=32, norm="rmsnorm", ffn="swiglu",
                     position="rope", qkv_bias=True)


def shard_over_8_devices(params: dict) -> dict:
  """Each leaf split over a (fsdp=4, tensor=2) mesh on the first two of its non-layer dims that
  divide, as an FSDP + tensor-parallel trainer would hold it."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))

  def place(path, leaf):
    stacked = jax.tree_util.keystr(path).startswith("['layers']")
    spec, free = [None] * leaf.ndim, ["fsdp", "tensor"]
    for dim in range(1 if stacked else 0, leaf.ndim):
      if free and leaf.shape[dim] % mesh.shape[free[0]] == 0:
        spec[dim] = free.pop(0)
    return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(*spec)))

  return jax.tree_util.tree_map_with_path(place, params)


def test_sharded_params_export_byte_identical_sharded_files(tmp_path):
  host = helpers.perturbed_params(CONFIG)
  sharded = shard_over_8_devices(host)
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree_util.tree_leaves(sharded))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(sharded))

  to_huggingface(host, CONFIG, str(tmp_path / "host"), max_shard_size="40KB")
  result = to_huggingface(sharded, CONFIG, str(tmp_path / "sharded"), max_shard_size="40KB")
  weight_files = [f for f in result.files if f.endswith(".safetensors")]
  assert len(weight_files) > 3 and safetensors_io.INDEX_FILE in result.files
  for name in weight_files + [safetensors_io.INDEX_FILE]:
    assert (tmp_path / "host" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    assert os.path.getsize(tmp_path / "sharded" / name) <= 40_000 + 4_000 or name.endswith(".json")

  tokens = helpers.random_tokens(CONFIG.vocab_size)
  diff = np.abs(helpers.jax_logits(sharded, CONFIG, tokens)
                - helpers.hf_logits(str(tmp_path / "sharded"), tokens)).max()
  assert diff <= helpers.TOLERANCE


def test_export_fetches_one_layer_at_a_time(monkeypatch, tmp_path):
  """No host transfer is larger than one layer of one leaf (or one unstacked leaf)."""
  sharded = shard_over_8_devices(helpers.perturbed_params(CONFIG))
  fetched = []
  original = exporter.HostSlices.get

  def spy(self, path, layer):
    out = original(self, path, layer)
    fetched.append((path, layer, out.nbytes))
    return out

  monkeypatch.setattr(exporter.HostSlices, "get", spy)
  to_huggingface(sharded, CONFIG, str(tmp_path))
  stacked = [(p, l) for p, l, _ in fetched if p[0] == "layers"]
  assert stacked and all(layer is not None for _, layer in stacked)
  largest_leaf = max(math.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(sharded))
  largest_unstacked = CONFIG.vocab_size * CONFIG.d_model * 4
  assert max(nbytes for _, _, nbytes in fetched) == largest_unstacked < largest_leaf


def test_bfloat16_export_and_import(tmp_path):
  params = helpers.perturbed_params(CONFIG)
  to_huggingface(params, CONFIG, str(tmp_path / "cast"), dtype="bfloat16")
  header = safetensors_io.SafetensorsReader(str(tmp_path / "cast"))
  assert header.get("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16
  with open(tmp_path / "cast" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  imported, config = from_huggingface(str(tmp_path / "cast"))
  rounded = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  assert config == CONFIG and helpers.leaves_equal(imported, rounded)

  bf16_config = dataclasses.replace(CONFIG, param_dtype="bfloat16")
  bf16_params = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  to_huggingface(bf16_params, bf16_config, str(tmp_path / "native"))
  imported, config = from_huggingface(str(tmp_path / "native"))
  assert config == bf16_config and helpers.leaves_equal(imported, bf16_params)
  imported, config = from_huggingface(str(tmp_path / "native"), param_dtype="float32")
  assert config.param_dtype == "float32"
  assert helpers.leaves_equal(imported, rounded)


def test_exporting_again_into_the_same_folder_leaves_no_stale_files(tmp_path):
  """A sharded reference export replaced by a single-file native one: nothing of the first stays."""
  params = helpers.perturbed_params(CONFIG)
  to_huggingface(params, CONFIG, str(tmp_path), target="torch", max_shard_size="30KB")
  assert (tmp_path / "modeling_glmjax.py").exists()
  result = to_huggingface(params, CONFIG, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(result.files)
  assert exporter.MANIFEST_FILE in result.files and "model.safetensors" in result.files
  tokens = helpers.random_tokens(CONFIG.vocab_size)
  diff = np.abs(helpers.jax_logits(params, CONFIG, tokens) - helpers.hf_logits(str(tmp_path), tokens))
  assert diff.max() <= helpers.TOLERANCE
