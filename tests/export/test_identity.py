"""What an export says the model is: architecture fields only (no runtime fields), and for the
reference model an auto_map that lets transformers load it as remote code."""

import dataclasses
import json
import logging

import numpy as np
import torch
import transformers

from glmjax.export import exporter, from_huggingface, importer, targets, to_huggingface
from glmjax.model import ModelConfig, presets
from glmjax.model.config import RUNTIME_FIELDS, architecture_fields
from tests.export import helpers

RUNTIME = {"attention_impl": "xla", "dtype": "bfloat16", "remat_policy": "dots_saveable"}


def test_runtime_fields_are_the_ones_that_do_not_change_the_function():
  assert RUNTIME_FIELDS == set(RUNTIME)
  fields = architecture_fields(ModelConfig())
  assert "param_dtype" in fields and not RUNTIME_FIELDS & set(fields)
  assert list(fields) == [f.name for f in dataclasses.fields(ModelConfig) if f.name in fields]


def test_runtime_fields_stay_out_of_config_json_and_model_gin(tmp_path):
  config = dataclasses.replace(presets.get("tiny-llama"), **RUNTIME)
  params = helpers.perturbed_params(config)
  to_huggingface(params, config, str(tmp_path))
  stored = json.loads((tmp_path / "config.json").read_text())[targets.CONFIG_KEY]
  assert stored == architecture_fields(config)
  imported, imported_config = from_huggingface(str(tmp_path))
  assert imported_config == dataclasses.replace(config, attention_impl="auto", dtype="float32",
                                                remat_policy="auto")
  assert helpers.leaves_equal(imported, params)

  gin = importer.model_gin(imported_config, str(tmp_path))
  bound = [line.split("=")[0].strip() for line in gin.splitlines() if line.startswith("ModelConfig.")]
  assert bound == [f"ModelConfig.{name}" for name in architecture_fields(config)]


def test_an_older_export_with_runtime_fields_imports_quietly(tmp_path, caplog):
  config = presets.get("tiny-llama")
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path))
  raw = json.loads((tmp_path / "config.json").read_text())
  raw[targets.CONFIG_KEY].update(RUNTIME)
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with caplog.at_level(logging.WARNING):
    _, imported = from_huggingface(str(tmp_path))
  assert imported == config and not caplog.records


def test_reference_export_loads_with_auto_model_and_remote_code(tmp_path):
  config = presets.get("tiny-glm")
  params = helpers.perturbed_params(config)
  result = to_huggingface(params, config, str(tmp_path))
  assert result.target == "torch"
  raw = json.loads((tmp_path / "config.json").read_text())
  assert raw["auto_map"] == exporter.AUTO_MAP

  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
  assert type(model).__name__ == "GLMJaxForCausalLM" and isinstance(model, transformers.PreTrainedModel)
  batch = {"positions": np.tile(np.arange(11), (2, 1)), "block_positions": np.zeros((2, 11), int)}
  tokens = helpers.random_tokens(config.vocab_size, (2, 11))
  expected = helpers.jax_logits(params, config, tokens, **batch)
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long),
                   **{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  assert np.abs(logits - expected).max() <= 1e-5

  model.save_pretrained(str(tmp_path / "saved"))  # a transformers round trip imports exactly
  imported, imported_config = from_huggingface(str(tmp_path / "saved"))
  assert imported_config == config and helpers.leaves_equal(imported, params)


def test_native_exports_have_no_auto_map(tmp_path):
  config = presets.get("tiny-llama")
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path))
  assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
