"""PEFT round trip with the real `peft` package: glmjax adapters -> adapter folder ->
peft.PeftModel on the exported transformers LLaMA gives glmjax's LoRA logits (1e-4); an adapter
made by peft itself imports onto the glmjax base with peft's logits; export -> import is exact."""

import json
import os

import jax
import numpy as np
import peft  # the test extra
import pytest
import torch
import transformers

from glmjax.export import peft as peft_io
from glmjax.export import to_huggingface
from glmjax.tuning import lora as lora_lib
from glmjax.tuning.lora import LoraConfig
from tests.export.helpers import TOLERANCE, hf_logits, jax_logits, perturbed_params, random_tokens
from tests.train.helpers import tiny_model


CONFIG = tiny_model()
TOKENS = random_tokens(CONFIG.vocab_size, (2, 11))


def _with_random_adapters(params, lora, seed=0):
  adapted = lora_lib.apply_lora(params, CONFIG, lora, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def fill(x):
    if not lora_lib.is_lora(x):
      return x
    return lora_lib.LoraWeight(x.base, np.asarray(x.a), 0.3 * rng.standard_normal(x.b.shape).astype(np.float32),
                               x.scale, x.in_ndim)
  return jax.tree.map(fill, adapted, is_leaf=lora_lib.is_lora)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  params = perturbed_params(CONFIG, seed=3)
  folder = str(tmp_path_factory.mktemp("peft") / "base")
  to_huggingface(params, CONFIG, folder, target="llama")
  return params, folder


def _peft_logits(base_dir, adapter_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, adapter_dir)
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def test_exported_adapters_load_in_peft_with_glmjax_logits(base, tmp_path):
  params, base_dir = base
  adapted = _with_random_adapters(params, LoraConfig(rank=4, alpha=8.0, targets=("all",)))
  out = str(tmp_path / "adapter")
  assert peft_io.save_adapters(adapted, CONFIG, out, base_model_name_or_path=base_dir) == [
      "adapter_config.json", "adapter_model.safetensors"]
  with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
  assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  ours = jax_logits(adapted, CONFIG, TOKENS)
  theirs = _peft_logits(base_dir, out)
  assert np.abs(ours - jax_logits(params, CONFIG, TOKENS)).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)
  # and back: import is the exported adapters exactly
  lora, imported = peft_io.load_adapters(out, params, CONFIG)
  assert lora == LoraConfig(rank=4, alpha=8.0, targets=tuple(sorted(lora_lib.PROJECTIONS)))
  for (_, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(adapted)[0],
                            jax.tree_util.tree_flatten_with_path(imported)[0]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rope_layout_permutation_of_q_and_k(tmp_path):
  import dataclasses
  config = dataclasses.replace(CONFIG, rope_layout="interleaved")  # LLaMA's is rotate_half
  params = perturbed_params(config, seed=5)
  base_dir = str(tmp_path / "base")
  to_huggingface(params, config, base_dir, target="llama")
  adapted = _with_random_adapters(params, LoraConfig(rank=3, alpha=6.0, targets=("wq", "wk")), seed=1)
  peft_io.save_adapters(adapted, config, str(tmp_path / "adapter"), target="llama")
  np.testing.assert_allclose(_peft_logits(base_dir, str(tmp_path / "adapter")),
                             jax_logits(adapted, config, TOKENS), atol=TOLERANCE, rtol=0)


def test_an_adapter_made_by_peft_imports_with_peft_logits(base, tmp_path):
  params, base_dir = base
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")  # random B
  model = peft.get_peft_model(model, config)
  out = str(tmp_path / "from_peft")
  model.save_pretrained(out)
  lora, imported = peft_io.load_adapters(out, params, CONFIG)
  assert lora == LoraConfig(rank=2, alpha=5.0, targets=("w_down", "wq", "wv"))
  theirs = _peft_logits(base_dir, out)
  np.testing.assert_allclose(jax_logits(imported, CONFIG, TOKENS), theirs, atol=TOLERANCE, rtol=0)
  assert np.abs(theirs - hf_logits(base_dir, TOKENS)).max() > 1e-3


def test_fused_projection_is_refused_by_name(tmp_path):
  import dataclasses
  glm4 = dataclasses.replace(CONFIG, rope_layout="interleaved")
  params = _with_random_adapters(perturbed_params(glm4), LoraConfig(rank=2, targets=("w_up",)))
  with pytest.raises(ValueError, match=r"LoraConfig.targets: \['w_up'\] are fused"):
    peft_io.save_adapters(params, glm4, str(tmp_path / "x"), target="glm")


def test_not_an_adapter_folder_is_one_line(base, tmp_path):
  with pytest.raises(ValueError, match="adapter_config.json") as info:
    peft_io.load_adapters(str(tmp_path), base[0], CONFIG)
  assert "\n" not in str(info.value)


def test_lora_dropout_goes_into_adapter_config_and_back(base, tmp_path):
  """LoraConfig.dropout is written as adapter_config.json's lora_dropout: real peft builds its
  Dropout(p) from it, and load_adapters reads it back; an adapter peft saves with a rate imports
  with that rate."""
  params, base_dir = base
  adapted = _with_random_adapters(params, LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv")))
  out = str(tmp_path / "adapter")
  peft_io.save_adapters(adapted, CONFIG, out, base_model_name_or_path=base_dir, lora_dropout=0.1)
  with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
    assert json.load(f)["lora_dropout"] == 0.1
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, out)
  assert model.peft_config["default"].lora_dropout == 0.1
  q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
  assert isinstance(q_proj.lora_dropout["default"], torch.nn.Dropout) and q_proj.lora_dropout["default"].p == 0.1
  lora, _ = peft_io.load_adapters(out, params, CONFIG)
  assert lora == LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv"), dropout=0.1)

  made = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                             peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=["v_proj"],
                                             task_type="CAUSAL_LM"))
  made.save_pretrained(str(tmp_path / "from_peft"))
  lora, _ = peft_io.load_adapters(str(tmp_path / "from_peft"), params, CONFIG)
  assert lora.dropout == 0.05 and lora.targets == ("wv",)
  with pytest.raises(ValueError, match="lora_dropout"):
    peft_io.save_adapters(adapted, CONFIG, str(tmp_path / "bad"), lora_dropout=1.0)


def test_a_peft_adapter_imports_onto_an_imported_base(tmp_path):
  """The issue's import direction end to end: a LLaMA made by transformers itself (not a glmjax
  export), imported by glmjax.export.from_huggingface; a peft adapter with random B on it
  (init_lora_weights=False); load_adapters puts the adapter on the imported params, and glmjax's logits are peft's."""
  from glmjax.export import from_huggingface
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)
  base_dir = str(tmp_path / "hf_base")
  transformers.LlamaForCausalLM(hf_config).save_pretrained(base_dir)
  params, config = from_huggingface(base_dir)
  model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                              peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, init_lora_weights=False,
                                              target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                              task_type="CAUSAL_LM"))
  adapter_dir = str(tmp_path / "adapter")
  model.save_pretrained(adapter_dir)
  lora, adapted = peft_io.load_adapters(adapter_dir, params, config)
  assert lora == LoraConfig(rank=3, alpha=6.0, targets=("w_up", "wk", "wo", "wq"), dropout=0.1)
  tokens = random_tokens(config.vocab_size, (2, 9))
  model.eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(jax_logits(adapted, config, tokens), theirs, atol=TOLERANCE, rtol=0)
  assert np.abs(theirs - hf_logits(base_dir, tokens)).max() > 1e-3  # the adapter matters
