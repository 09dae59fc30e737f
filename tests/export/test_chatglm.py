"""ChatGLM2/3 / GLM-4 (`model_type "chatglm"`) checkpoints in their own layout: imported, and the
logits checked against transformers' GlmForCausalLM holding the same weights, re-laid here."""

import numpy as np
import pytest
import torch
import transformers

from glmjax.export import from_huggingface
from tests.export import glm_family, helpers


def glm_for_causal_lm(config: dict, sd: dict) -> "torch.nn.Module":
  """transformers' GlmForCausalLM with ChatGLM's weights: query_key_value split into q/k/v
  ([q heads; k groups; v groups], or [head, (q, k, v), hn] without multi_query_attention),
  dense -> o_proj, dense_h_to_4h ([gate; up]) -> gate_up_proj, output_layer -> lm_head."""
  H, Dh = config["num_attention_heads"], config["kv_channels"]
  K = config["multi_query_group_num"] if config["multi_query_attention"] else H
  hf = transformers.GlmConfig(
      vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
      intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
      num_attention_heads=H, num_key_value_heads=K, head_dim=Dh, attention_bias=True,
      rms_norm_eps=config["layernorm_epsilon"], max_position_embeddings=config["seq_length"],
      tie_word_embeddings=False, pad_token_id=0,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config["rope_ratio"],
                       "partial_rotary_factor": 0.5})
  model = transformers.GlmForCausalLM(hf).eval()
  state = {"model.embed_tokens.weight": sd["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": sd["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": sd["transformer.output_layer.weight"]}
  for i in range(config["num_layers"]):
    p, q = f"transformer.encoder.layers.{i}", f"model.layers.{i}"
    w = sd[f"{p}.self_attention.query_key_value.weight"]
    b = sd[f"{p}.self_attention.query_key_value.bias"]
    if config["multi_query_attention"]:
      cuts = [H * Dh, (H + K) * Dh]
      wq, wk, wv = np.split(w, cuts)
      bq, bk, bv = np.split(b, cuts)
    else:
      w3 = w.reshape(H, 3, Dh, -1)
      wq, wk, wv = (w3[:, j].reshape(H * Dh, -1) for j in range(3))
      b3 = b.reshape(H, 3, Dh)
      bq, bk, bv = (b3[:, j].reshape(-1) for j in range(3))
    state.update({
        f"{q}.input_layernorm.weight": sd[f"{p}.input_layernorm.weight"],
        f"{q}.post_attention_layernorm.weight": sd[f"{p}.post_attention_layernorm.weight"],
        f"{q}.self_attn.q_proj.weight": wq, f"{q}.self_attn.k_proj.weight": wk,
        f"{q}.self_attn.v_proj.weight": wv, f"{q}.self_attn.q_proj.bias": bq,
        f"{q}.self_attn.k_proj.bias": bk, f"{q}.self_attn.v_proj.bias": bv,
        f"{q}.self_attn.o_proj.weight": sd[f"{p}.self_attention.dense.weight"],
        f"{q}.mlp.gate_up_proj.weight": sd[f"{p}.mlp.dense_h_to_4h.weight"],
        f"{q}.mlp.down_proj.weight": sd[f"{p}.mlp.dense_4h_to_h.weight"]})
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
  assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
  return model


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


CASES = {
    "chatglm3_safetensors": dict(rope_ratio=1.0, writer="safetensors"),
    "glm4_rope_ratio_500_bin_shards": dict(rope_ratio=500.0, writer="bin3"),
    "chatglm_no_mqa_bin": dict(rope_ratio=50.0, mqa=False, writer="bin1"),
}


def write(case, folder):
  args = dict(CASES[case])
  writer = args.pop("writer")
  config, sd = glm_family.chatglm2(**args)
  if writer == "safetensors":
    return config, sd, glm_family.save_safetensors(folder, config, sd)
  return config, sd, glm_family.save_bin(folder, config, sd, shards=int(writer[-1]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_chatglm_checkpoint_gives_glm_for_causal_lm_logits(case, tmp_path):
  config, sd, folder = write(case, tmp_path / "ckpt")
  params, mc = from_huggingface(folder)
  assert (mc.num_heads, mc.num_kv_heads, mc.head_dim) == (
      4, 2 if config["multi_query_attention"] else 4, 8)
  assert mc.rope_theta == 10000.0 * config["rope_ratio"]
  assert (mc.rotary_fraction, mc.rope_layout, mc.prompt_layout) == (0.5, "interleaved", "causal")
  tokens = helpers.random_tokens(mc.vocab_size, (2, 17))
  expected = torch_logits(glm_for_causal_lm(config, sd), tokens)
  diff = np.abs(helpers.jax_logits(params, mc, tokens) - expected).max()
  assert diff <= helpers.TOLERANCE, f"{case}: max |logits diff| = {diff}"


def test_rope_ratio_changes_the_logits(tmp_path):
  """The large rope_ratio case above is not vacuous: the same weights under ratio 1 differ."""
  config, sd = glm_family.chatglm2(rope_ratio=500.0)
  params, mc = from_huggingface(glm_family.save_safetensors(tmp_path / "a", config, sd))
  config1 = dict(config, rope_ratio=1.0)
  tokens = helpers.random_tokens(mc.vocab_size, (1, 17))
  other = torch_logits(glm_for_causal_lm(config1, sd), tokens)
  assert np.abs(helpers.jax_logits(params, mc, tokens) - other).max() > 1e-2


def test_bfloat16_bin_checkpoint_keeps_its_values(tmp_path):
  """GLM-4's config (bfloat16, eos list, tiny layernorm_epsilon) from pytorch_model.bin shards:
  bfloat16 tensors arrive bit for bit, without a float32 detour."""
  config, sd = glm_family.chatglm2(rope_ratio=500.0)
  config.update(torch_dtype="bfloat16", eos_token_id=[2, 5, 7], layernorm_epsilon=1.5625e-07,
                classifier_dropout=None)
  folder = tmp_path / "glm4"
  glm_family.write_config(folder, config)
  bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
  torch.save(bf16, folder / "pytorch_model.bin")
  params, mc = from_huggingface(str(folder))
  assert mc.param_dtype == "bfloat16" and mc.norm_eps == 1.5625e-07
  embedding = params["embed"]["embedding"]
  expected = bf16["transformer.embedding.word_embeddings.weight"].view(torch.int16).numpy()
  assert embedding.dtype.name == "bfloat16" and np.array_equal(embedding.view(np.int16), expected)
