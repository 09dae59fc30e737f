"""`export --target chatglm`: ChatGLM2/3 / GLM-4's own names, shapes and config.json; the written
weights give glmjax's logits in transformers' GlmForCausalLM (re-laid as in test_chatglm), and
export -> import is bit-exact, also through the CLI (import -> export of a run directory)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from glmjax import cli
from glmjax.export import from_huggingface, to_huggingface
from glmjax.export.safetensors_io import SafetensorsReader
from glmjax.model import presets
from glmjax.run.load import load_params
from tests.export import glm_family, helpers
from tests.export.test_chatglm import glm_for_causal_lm, torch_logits

CONFIGS = {
    "tiny_chatglm2": presets.get("tiny-chatglm2"),
    # rotate_half params are permuted into ChatGLM's interleaved layout; theta 5e6 = rope_ratio 500
    "rotate_half_rope_ratio_500": presets.get("tiny-chatglm2", rope_layout="rotate_half",
                                              rope_theta=5e6, param_dtype="bfloat16"),
}


def read_folder(folder):
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  with SafetensorsReader(folder) as reader:
    sd = {n: np.asarray(reader.get(n), np.float32) for n in reader.names()}
  return config, sd


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_chatglm_layout_and_logits(name, tmp_path):
  config = CONFIGS[name]
  params = helpers.perturbed_params(config)
  if config.param_dtype == "bfloat16":
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
  out = str(tmp_path / "hf")
  result = to_huggingface(params, config, out, target="chatglm")
  assert result.architecture == "ChatGLMModel"
  hf, sd = read_folder(out)
  assert hf["model_type"] == "chatglm" and hf["padded_vocab_size"] == config.vocab_size
  assert (hf["multi_query_attention"], hf["multi_query_group_num"], hf["kv_channels"]) == (
      True, config.num_kv_heads, config.head_dim)
  assert hf["rope_ratio"] == config.rope_theta / 10000.0
  assert hf["auto_map"]["AutoModelForCausalLM"].endswith(
      "modeling_chatglm.ChatGLMForConditionalGeneration")

  published, published_sd = glm_family.chatglm2()  # the published names (minus the rope buffer)
  assert set(sd) == set(published_sd) - {"transformer.rotary_pos_emb.inv_freq"}
  assert set(published) - {"architectures", "auto_map", "eos_token_id", "pad_token_id",
                           "use_cache"} <= set(hf)

  tokens = helpers.random_tokens(config.vocab_size, (2, 15))
  f32 = dataclasses.replace(config, param_dtype="float32")
  expected = helpers.jax_logits(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params),
                                f32, tokens)
  diff = np.abs(torch_logits(glm_for_causal_lm(hf, sd), tokens) - expected).max()
  assert diff <= helpers.TOLERANCE, f"{name}: max |logits diff| = {diff}"

  back, back_config = from_huggingface(out)
  assert back_config == config
  assert helpers.leaves_equal(back, jax.tree_util.tree_map(np.asarray, params))


def test_cli_import_then_export_chatglm_is_bit_exact(tmp_path):
  """glmjax import (ChatGLM3 folder) -> run directory -> glmjax export --target chatglm: the same
  tensors, bit for bit, and the same architecture fields."""
  config, sd = glm_family.chatglm2(rope_ratio=50.0)
  source = glm_family.save_safetensors(tmp_path / "chatglm3", config, sd)
  tokenizer = {"tokenizer.model": b"sentencepiece model bytes, copied as they are",
               "tokenizer_config.json": b'{"tokenizer_class": "ChatGLMTokenizer"}'}
  for name, data in tokenizer.items():
    with open(os.path.join(source, name), "wb") as f:
      f.write(data)
  run, out = str(tmp_path / "run"), str(tmp_path / "back")
  assert cli.main(["import", "--from", source, "--out", run, "--param_dtype", "stored"]) == 0
  assert load_params(run).config.prompt_layout == "causal"
  assert cli.main(["export", "--checkpoint", run, "--out", out, "--target", "chatglm"]) == 0
  for name, data in tokenizer.items():  # the tokenizer comes along both ways
    for folder in (os.path.join(run, "tokenizer"), out):
      with open(os.path.join(folder, name), "rb") as f:
        assert f.read() == data, (folder, name)
  hf, back = read_folder(out)
  expected = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
  assert set(back) == set(expected)
  assert all(np.array_equal(back[k], expected[k]) for k in expected)
  for key in ("padded_vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "kv_channels",
              "num_attention_heads", "multi_query_group_num", "seq_length", "rope_ratio",
              "add_qkv_bias", "add_bias_linear", "layernorm_epsilon"):
    assert hf[key] == config[key], key


def test_export_meets_chatglm_cpp_converter(tmp_path):
  """What chatglm.cpp's ChatGLM2Converter (li-plus/chatglm.cpp chatglm_cpp/convert.py) asserts of
  config.json and the weight names it dumps, for a model with its supported switches."""
  config = presets.get("tiny-chatglm2", d_model=32, num_heads=4, head_dim=8)
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path / "hf"), target="chatglm")
  hf, sd = read_folder(str(tmp_path / "hf"))
  assert hf["add_bias_linear"] is False and hf["add_qkv_bias"] is True
  assert hf["apply_residual_connection_post_layernorm"] is False
  assert hf["kv_channels"] * hf["num_attention_heads"] == hf["hidden_size"]
  assert hf["multi_query_attention"] is True and hf["original_rope"] is True
  assert hf["post_layer_norm"] is True and hf["rmsnorm"] is True
  assert "AutoModel" in hf["auto_map"]
  for key in ("padded_vocab_size", "hidden_size", "num_attention_heads", "num_layers",
              "ffn_hidden_size", "seq_length", "multi_query_group_num"):
    assert isinstance(hf[key], int), key
  names = ["transformer.embedding.word_embeddings.weight"]
  for i in range(config.num_layers):
    p = f"transformer.encoder.layers.{i}"
    names += [f"{p}.input_layernorm.weight", f"{p}.self_attention.query_key_value.weight",
              f"{p}.self_attention.query_key_value.bias", f"{p}.self_attention.dense.weight",
              f"{p}.post_attention_layernorm.weight", f"{p}.mlp.dense_h_to_4h.weight",
              f"{p}.mlp.dense_4h_to_h.weight"]
  names += ["transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"]
  assert sorted(names) == sorted(sd)


def test_tied_model_exports_its_embedding_as_output_layer(tmp_path):
  """ChatGLM always has transformer.output_layer: a tied glmjax model writes the embedding there;
  with the stored config it comes back tied, without it as an untied copy."""
  config = presets.get("tiny-chatglm2", tie_embeddings=True)
  params = helpers.perturbed_params(config)
  out = str(tmp_path / "hf")
  to_huggingface(params, config, out, target="chatglm")
  _, sd = read_folder(out)
  assert np.array_equal(sd["transformer.output_layer.weight"], params["embed"]["embedding"])
  back, back_config = from_huggingface(out)
  assert back_config == config and helpers.leaves_equal(back, jax.tree_util.tree_map(np.asarray, params))
  plain, plain_config = from_huggingface(out, use_stored_config=False)
  assert not plain_config.tie_embeddings
  assert np.array_equal(plain["lm_head"]["kernel"], params["embed"]["embedding"].T)


def test_export_chatglm_names_the_blocking_fields(tmp_path):
  with pytest.raises(ValueError, match=r"ModelConfig.rotary_fraction=1.0.*half of each head"):
    to_huggingface(helpers.perturbed_params(presets.get("tiny-llama")), presets.get("tiny-llama"),
                   str(tmp_path / "x"), target="chatglm")
