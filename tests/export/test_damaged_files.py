"""A truncated or missing file on import is a ValueError that names it and says what to do, from
glmjax's importer and from the torch-only loader of modeling_glmjax.py."""

import json
import os

import pytest

from glmjax.export import from_huggingface, safetensors_io, to_huggingface, torch_model
from glmjax.model import ModelConfig
from tests.export import helpers

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, ffn_dim=64, max_length=16, norm="rmsnorm", ffn="swiglu")
FIX = "re-download or re-export it"


@pytest.fixture(params=["llama", "torch"])
def export(request, tmp_path):
  """A sharded export (native and reference targets) and its shard names."""
  out = tmp_path / request.param
  result = to_huggingface(helpers.perturbed_params(CONFIG), CONFIG, str(out), target=request.param,
                          max_shard_size="20KB")
  return out, sorted(f for f in result.files if f.endswith(".safetensors"))


def truncate(path, keep: float = 0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def loaders(out):
  """Both readers of an export folder: glmjax import, and the torch-only loader."""
  yield lambda: from_huggingface(str(out))
  if (out / "modeling_glmjax.py").exists():
    yield lambda: (torch_model.read_config(str(out)), torch_model.load_safetensors_dir(str(out)))


def assert_names(out, name, what):
  for load in loaders(out):
    with pytest.raises(ValueError) as error:
      load()
    message = str(error.value)
    assert str(out / name) in message and what in message and FIX in message, message


def test_truncated_config_json(export):
  out, _ = export
  truncate(out / "config.json")
  assert_names(out, "config.json", "is not a readable config.json (truncated?)")


def test_truncated_shard(export):
  out, shards = export
  truncate(out / shards[1], keep=0.9)
  assert_names(out, shards[1], "is not a readable safetensors file (truncated?)")


def test_shard_cut_inside_its_header(export):
  out, shards = export
  truncate(out / shards[0], keep=0.0005)
  assert_names(out, shards[0], "is not a readable safetensors file")


def test_missing_shard(export):
  out, shards = export
  os.remove(out / shards[-1])
  assert_names(out, shards[-1], "is missing")


def test_truncated_index(export):
  out, _ = export
  truncate(out / safetensors_io.INDEX_FILE)
  assert_names(out, safetensors_io.INDEX_FILE, "is not a readable safetensors index")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, export):
  out, shards = export
  index = json.loads((out / safetensors_io.INDEX_FILE).read_text())
  index["weight_map"]["extra.weight"] = shards[0]
  (out / safetensors_io.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match="lists tensors it does not hold: \\['extra.weight'\\]"):
    from_huggingface(str(out))


def test_truncated_single_file(tmp_path):
  out = tmp_path / "single"
  to_huggingface(helpers.perturbed_params(CONFIG), CONFIG, str(out))
  truncate(out / "model.safetensors", keep=0.99)
  assert_names(out, "model.safetensors", "is not a readable safetensors file (truncated?)")
