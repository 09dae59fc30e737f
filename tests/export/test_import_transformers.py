"""Import of checkpoints transformers wrote itself (no glmjax metadata): the ModelConfig comes from
the transformers config, and glmjax's forward gives the transformers model's logits."""

import numpy as np
import pytest
import torch
import transformers

from glmjax.export import from_huggingface
from tests.export import helpers

ROPE = {"rope_type": "default", "rope_theta": 1000.0}

CASES = {
    "llama_gqa_biases": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=10, attention_bias=True,
        hidden_act="gelu_pytorch_tanh", rope_parameters=dict(ROPE), max_position_embeddings=64),
    "glm": lambda: transformers.GlmConfig(
        vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, attention_bias=True,
        max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
        rope_parameters=dict(ROPE, partial_rotary_factor=0.5)),
    "glm4_sandwich": lambda: transformers.Glm4Config(
        vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=12, attention_bias=False,
        max_position_embeddings=64, pad_token_id=0,
        rope_parameters=dict(ROPE, partial_rotary_factor=0.5)),
    "cohere": lambda: transformers.CohereConfig(
        vocab_size=89, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, logit_scale=1.0,
        max_position_embeddings=64, rope_parameters=dict(ROPE)),
    "gpt_neox_parallel": lambda: transformers.GPTNeoXConfig(
        vocab_size=103, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, max_position_embeddings=64, use_parallel_residual=True,
        rope_parameters=dict(ROPE, partial_rotary_factor=0.25)),
    "gpt_neox_sequential_tied": lambda: transformers.GPTNeoXConfig(
        vocab_size=103, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, max_position_embeddings=64, use_parallel_residual=False,
        attention_bias=False, tie_word_embeddings=True, hidden_act="relu",
        rope_parameters=dict(ROPE, partial_rotary_factor=0.5)),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=103, n_embd=48, n_layer=2, n_head=6, n_inner=72, n_positions=32),
    "gpt2_untied_relu": lambda: transformers.GPT2Config(
        vocab_size=99, n_embd=48, n_layer=2, n_head=3, n_positions=32, activation_function="relu",
        tie_word_embeddings=False),
    "bloom": lambda: transformers.BloomConfig(vocab_size=91, hidden_size=48, n_layer=2, n_head=6),
}


def build(config) -> "torch.nn.Module":
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():  # zero biases and unit norms would hide wrong mappings
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_params_give_the_transformers_logits(name, tmp_path):
  model = build(CASES[name]())
  model.save_pretrained(str(tmp_path))
  params, config = from_huggingface(str(tmp_path))
  assert config.vocab_size == model.config.vocab_size
  assert config.num_layers == 2
  # A transformers CausalLM is prompted causally: its run must not train or score GLM blank
  # infilling prompts (bidirectional Part A) by default.
  assert config.prompt_layout == "causal"

  tokens = helpers.random_tokens(config.vocab_size, (2, 11))
  with torch.no_grad():
    expected = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  diff = np.abs(helpers.jax_logits(params, config, tokens) - expected).max()
  assert diff <= helpers.TOLERANCE, f"{name}: max |logits diff| = {diff}"
