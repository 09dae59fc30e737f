"""Unsupported combinations and bad inputs fail early with messages naming the field and target."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers

from glmjax.export import from_huggingface, safetensors_io, to_huggingface
from glmjax.model import presets
from tests.export import helpers

GLM = presets.get("tiny-glm")
MOE = presets.get("tiny-moe")


def test_a_named_target_lists_every_field_that_blocks_it(tmp_path):
  with pytest.raises(ValueError) as error:
    to_huggingface(helpers.perturbed_params(GLM), GLM, str(tmp_path / "out"), target="llama")
  message = str(error.value)
  assert "LlamaForCausalLM cannot represent" in message
  for blocker in ("ModelConfig.norm='layernorm'", "ModelConfig.position='learned_2d'",
                  "ModelConfig.ffn='gelu_tanh'"):
    assert blocker in message
  assert not (tmp_path / "out").exists()


def test_native_only_names_the_blocking_field_of_each_class(tmp_path):
  with pytest.raises(ValueError) as error:
    to_huggingface(helpers.perturbed_params(MOE), MOE, str(tmp_path), target="native")
  message = str(error.value)
  for architecture in ("LlamaForCausalLM", "GlmForCausalLM", "CohereForCausalLM",
                       "GPTNeoXForCausalLM", "GPT2LMHeadModel", "BloomForCausalLM"):
    assert architecture in message
  assert message.count("ModelConfig.num_experts=4") == 6
  assert "target='torch'" in message


def test_bloom_needs_its_fixed_mlp_width():
  config = dataclasses.replace(presets.get("tiny-bloom"), ffn_dim=64)
  with pytest.raises(ValueError, match=r"ModelConfig.ffn_dim=64: BLOOM's MLP width is 4 \* d_model = 128"):
    to_huggingface({}, config, "unused", target="bloom")


def test_unknown_target_and_dtype(tmp_path):
  config = presets.get("tiny-llama")
  with pytest.raises(ValueError, match="unknown export target 'mistral'"):
    to_huggingface({}, config, str(tmp_path), target="mistral")
  with pytest.raises(ValueError, match="dtype='int8'"):
    to_huggingface(helpers.perturbed_params(config), config, str(tmp_path), dtype="int8")


def test_params_that_do_not_match_the_config_are_refused(tmp_path):
  config = presets.get("tiny-llama")
  params = helpers.perturbed_params(config)
  wrong = dataclasses.replace(config, ffn_dim=32)
  with pytest.raises(ValueError, match=r"params\[layers/mlp/w_up\] has shape \(2, 32, 64\)"):
    to_huggingface(params, wrong, str(tmp_path))
  del params["layers"]["attn"]["wq"]
  with pytest.raises(ValueError, match="missing \\['layers/attn/wq'\\]"):
    to_huggingface(params, config, str(tmp_path))


def test_import_refuses_unknown_model_types_and_rope_scaling(tmp_path):
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(ValueError, match="model_type='t5' is not importable"):
    from_huggingface(str(tmp_path / "t5"))

  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                              "rope_theta": 10000.0})
  transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "scaled"))
  with pytest.raises(ValueError, match="rope_type='dynamic'"):  # linear / yarn / llama3 import
    from_huggingface(str(tmp_path / "scaled"))


def test_missing_tensor_is_named(tmp_path):
  config = presets.get("tiny-llama")
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path))
  reader = safetensors_io.SafetensorsReader(str(tmp_path))
  kept = {n: np.array(reader.get(n)) for n in reader.names()
          if n != "model.layers.1.mlp.up_proj.weight"}
  safetensors_io.write_file(str(tmp_path / "model.safetensors"), [
      safetensors_io.PendingTensor(n, a.shape, a.dtype, lambda a=a: a) for n, a in kept.items()],
      {"format": "pt"})
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
    from_huggingface(str(tmp_path))


def test_a_bias_edited_in_torch_is_imported_as_a_plain_model(tmp_path):
  """Zeros written for a bias the glmjax model lacks: once trained to nonzero in PyTorch, import
  ignores the stored glmjax config and keeps the bias (no weight is dropped)."""
  config = dataclasses.replace(presets.get("tiny-llama"), qkv_bias=True)
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path / "export"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                            dtype=torch.float32)
  with torch.no_grad():
    model.model.layers[0].self_attn.o_proj.bias.add_(0.5)
  model.save_pretrained(str(tmp_path / "tuned"))
  params, imported = from_huggingface(str(tmp_path / "tuned"))
  assert imported.attn_out_bias and imported.qkv_bias
  tokens = helpers.random_tokens(config.vocab_size)
  with torch.no_grad():
    expected = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(helpers.jax_logits(params, imported, tokens) - expected).max() <= helpers.TOLERANCE
