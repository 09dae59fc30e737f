"""Export -> transformers: logits parity per architecture, and import(export(params)) == params.

Every case is a randomly initialised tiny model with odd sizes (vocab not a
multiple of 64, GQA with 3 kv groups, MQA, partial rotary, head_dim apart from
d_model / heads where the class allows it, tied and untied embeddings, biases
on, off and half on) and noise on every param; transformers loads the folder
with AutoModelForCausalLM and no remote code.
"""

import json
import os

import numpy as np
import pytest

from glmjax.export import from_huggingface, to_huggingface
from glmjax.model import ModelConfig
from tests.export import helpers

BASE = dict(vocab_size=101, d_model=48, num_layers=2, num_heads=6, num_kv_heads=6, head_dim=8,
            ffn_dim=72, max_length=32)
LLAMA = dict(norm="rmsnorm", ffn="swiglu", position="rope")


def fields(*parts, **overrides) -> dict:
  out = {}
  for part in parts + (overrides,):
    out.update(part)
  return out

CASES = {
    "llama_gqa3_tied": ("LlamaForCausalLM", fields(
        BASE, LLAMA, num_kv_heads=3, head_dim=10, tie_embeddings=True)),
    "llama_biases_interleaved_untied": ("LlamaForCausalLM", fields(
        BASE, LLAMA, num_kv_heads=2, ffn="geglu_tanh", qkv_bias=True, mlp_bias=True,
        rope_layout="interleaved", rope_theta=500.0, norm_eps=1e-6, vocab_size=97)),
    "glm_chatglm2_style": ("GlmForCausalLM", fields(
        BASE, LLAMA, num_kv_heads=3, head_dim=12, rotary_fraction=0.5, rope_layout="interleaved",
        qkv_bias=True, vocab_size=131)),
    "glm4_sandwich_rotate_half_mqa": ("Glm4ForCausalLM", fields(
        BASE, LLAMA, norm_placement="sandwich", ffn="reglu", num_kv_heads=1, rotary_fraction=0.5,
        tie_embeddings=True)),
    "cohere_palm_style": ("CohereForCausalLM", fields(
        BASE, position="rope", norm="layernorm", norm_bias=False, parallel_block=True, ffn="swiglu",
        num_kv_heads=1, qkv_bias=True, tie_embeddings=True)),
    "neox_parallel_two_norms": ("GPTNeoXForCausalLM", fields(
        BASE, position="rope", ffn="gelu", parallel_block=True, parallel_shared_norm=False,
        rotary_fraction=0.25, qkv_bias=True, norm_bias=False)),
    "neox_shared_norm_interleaved_tied": ("GPTNeoXForCausalLM", fields(
        BASE, position="rope", ffn="gelu_tanh", parallel_block=True, rotary_fraction=0.5,
        rope_layout="interleaved", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=True)),
    "neox_sequential_relu": ("GPTNeoXForCausalLM", fields(
        BASE, position="rope", ffn="relu", attn_out_bias=True, mlp_bias=True)),
    "gpt2_tied": ("GPT2LMHeadModel", fields(
        BASE, position="learned", ffn="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=True, vocab_size=103)),
    "gpt2_untied_no_biases": ("GPT2LMHeadModel", fields(
        BASE, position="learned", ffn="silu", norm_bias=False)),
    "bloom_6_heads_tied": ("BloomForCausalLM", fields(
        BASE, position="alibi", embed_norm=True, ffn="gelu_tanh", ffn_dim=192, qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_embeddings=True, vocab_size=89)),
    "bloom_3_heads_untied_no_biases": ("BloomForCausalLM", fields(
        BASE, position="alibi", embed_norm=True, ffn="gelu_tanh", ffn_dim=192, num_heads=3,
        num_kv_heads=3, head_dim=16)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers_and_round_trip_is_exact(name, tmp_path):
  architecture, config_fields = CASES[name]
  config = ModelConfig(**config_fields)
  params = helpers.perturbed_params(config, seed=len(name))
  out = str(tmp_path / name)

  result = to_huggingface(params, config, out, target="native")
  assert result.architecture == architecture
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == [architecture]

  tokens = helpers.random_tokens(config.vocab_size)
  diff = np.abs(helpers.jax_logits(params, config, tokens) - helpers.hf_logits(out, tokens)).max()
  assert diff <= helpers.TOLERANCE, f"{architecture}: max |logits diff| = {diff}"

  imported, imported_config = from_huggingface(out)
  assert imported_config == config
  assert helpers.leaves_equal(imported, params)
