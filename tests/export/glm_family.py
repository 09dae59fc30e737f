"""Tiny checkpoints in the GLM family's original layouts, written as their own code saves them.

Names, fused layouts and config fields follow the published files (see
glmjax/export/families.py for the references); values are random. Each builder returns
(config.json dict, {tensor name: float32 array}).
"""

import json
import os

import numpy as np
import torch

V, D, LAYERS = 97, 32, 2


def _normal(rng, *shape, scale=0.2):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _norm(rng, prefix, bias=True):
  out = {f"{prefix}.weight": (1.0 + _normal(rng, D, scale=0.1))}
  if bias:
    out[f"{prefix}.bias"] = _normal(rng, D, scale=0.1)
  return out


def chatglm2(rope_ratio=1.0, heads=4, groups=2, kv_channels=8, ffn=48, mqa=True, seed=0):
  """ChatGLM2/3 / GLM-4 (`ChatGLMModel`): configuration_chatglm.py fields, modeling_chatglm.py names."""
  rng = np.random.default_rng(seed)
  groups = groups if mqa else heads
  config = {
      "architectures": ["ChatGLMModel"], "model_type": "chatglm",
      "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
      "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
      "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
      "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": ffn,
      "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": D,
      "kv_channels": kv_channels, "layernorm_epsilon": 1e-5, "multi_query_attention": mqa,
      "multi_query_group_num": groups, "num_attention_heads": heads, "num_layers": LAYERS,
      "original_rope": True, "padded_vocab_size": V, "post_layer_norm": True, "rmsnorm": True,
      "seq_length": 64, "use_cache": True, "torch_dtype": "float32", "tie_word_embeddings": False,
      "eos_token_id": 2, "pad_token_id": 0, "rope_ratio": rope_ratio}
  qkv = (heads + 2 * groups) * kv_channels
  sd = {"transformer.embedding.word_embeddings.weight": _normal(rng, V, D, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": np.arange(kv_channels // 4, dtype=np.float32)}
  for i in range(LAYERS):
    p = f"transformer.encoder.layers.{i}"
    sd.update(_norm(rng, f"{p}.input_layernorm", bias=False))
    sd[f"{p}.self_attention.query_key_value.weight"] = _normal(rng, qkv, D)
    sd[f"{p}.self_attention.query_key_value.bias"] = _normal(rng, qkv)
    sd[f"{p}.self_attention.dense.weight"] = _normal(rng, D, heads * kv_channels)
    sd.update(_norm(rng, f"{p}.post_attention_layernorm", bias=False))
    sd[f"{p}.mlp.dense_h_to_4h.weight"] = _normal(rng, 2 * ffn, D)
    sd[f"{p}.mlp.dense_4h_to_h.weight"] = _normal(rng, D, ffn)
  sd.update(_norm(rng, "transformer.encoder.final_layernorm", bias=False))
  sd["transformer.output_layer.weight"] = _normal(rng, V, D)
  return config, sd


def chatglm6b(heads=4, ffn=64, two_d=True, seed=0):
  """ChatGLM-6B: its configuration_chatglm.py fields and modeling_chatglm.py names."""
  rng = np.random.default_rng(seed)
  config = {
      "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": V,
      "hidden_size": D, "num_layers": LAYERS, "num_attention_heads": heads,
      "layernorm_epsilon": 1e-5, "inner_hidden_size": ffn, "max_sequence_length": 64,
      "position_encoding_2d": two_d, "bos_token_id": 94, "eos_token_id": 95, "mask_token_id": 92,
      "gmask_token_id": 93, "pad_token_id": 3, "pre_seq_len": None, "prefix_projection": False,
      "quantization_bit": 0, "torch_dtype": "float32", "use_cache": True}
  sd = {"transformer.word_embeddings.weight": _normal(rng, V, D, scale=1.0)}
  for i in range(LAYERS):
    p = f"transformer.layers.{i}"
    sd.update(_norm(rng, f"{p}.input_layernorm"))
    sd[f"{p}.attention.rotary_emb.inv_freq"] = np.ones(D // heads // 4, np.float32)
    sd[f"{p}.attention.query_key_value.weight"] = _normal(rng, 3 * D, D)
    sd[f"{p}.attention.query_key_value.bias"] = _normal(rng, 3 * D)
    sd[f"{p}.attention.dense.weight"] = _normal(rng, D, D)
    sd[f"{p}.attention.dense.bias"] = _normal(rng, D)
    sd.update(_norm(rng, f"{p}.post_attention_layernorm"))
    sd[f"{p}.mlp.dense_h_to_4h.weight"] = _normal(rng, ffn, D)
    sd[f"{p}.mlp.dense_h_to_4h.bias"] = _normal(rng, ffn)
    sd[f"{p}.mlp.dense_4h_to_h.weight"] = _normal(rng, D, ffn)
    sd[f"{p}.mlp.dense_4h_to_h.bias"] = _normal(rng, D)
  sd.update(_norm(rng, "transformer.final_layernorm"))
  sd["lm_head.weight"] = _normal(rng, V, D)
  return config, sd


def glm_block(heads=4, max_seq=32, block=True, prefix="glm.", seed=0):
  """GLM-10B / GLM-Large on the HF hub (`GLMModel`, configuration_glm.py fields)."""
  rng = np.random.default_rng(seed)
  config = {
      "architectures": ["GLMModel"], "model_type": "glm", "attention_dropout_prob": 0.1,
      "attention_scale": 1.0, "block_position_encoding": block, "checkpoint_activations": False,
      "checkpoint_num_layers": 1, "embedding_dropout_prob": 0.1, "hidden_size": D,
      "initializer_range": 0.02, "max_sequence_length": max_seq, "num_attention_heads": heads,
      "num_layers": LAYERS, "output_dropout_prob": 0.1, "output_predict": True,
      "parallel_output": True, "pool_token": "cls", "relative_encoding": False,
      "spell_func": "lstm", "spell_length": None, "torch_dtype": "float32", "vocab_size": V,
      "auto_map": {"AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"}}
  rows = max_seq + 1 if block else max_seq
  g = prefix
  sd = {f"{g}word_embeddings.weight": _normal(rng, V, D, scale=1.0),
        f"{g}transformer.position_embeddings.weight": _normal(rng, rows, D, scale=0.5)}
  if block:
    sd[f"{g}transformer.block_position_embeddings.weight"] = _normal(rng, rows, D, scale=0.5)
  for i in range(LAYERS):
    p = f"{g}transformer.layers.{i}"
    sd.update(_norm(rng, f"{p}.input_layernorm"))
    sd[f"{p}.attention.query_key_value.weight"] = _normal(rng, 3 * D, D)
    sd[f"{p}.attention.query_key_value.bias"] = _normal(rng, 3 * D)
    sd[f"{p}.attention.dense.weight"] = _normal(rng, D, D)
    sd[f"{p}.attention.dense.bias"] = _normal(rng, D)
    sd.update(_norm(rng, f"{p}.post_attention_layernorm"))
    sd[f"{p}.mlp.dense_h_to_4h.weight"] = _normal(rng, 4 * D, D)
    sd[f"{p}.mlp.dense_h_to_4h.bias"] = _normal(rng, 4 * D)
    sd[f"{p}.mlp.dense_4h_to_h.weight"] = _normal(rng, D, 4 * D)
    sd[f"{p}.mlp.dense_4h_to_h.bias"] = _normal(rng, D)
  sd.update(_norm(rng, f"{g}transformer.final_layernorm"))
  return config, sd


def glm130b(heads=8, inner=40, vocab=96, seed=0):
  """GLM-130B as one unsharded SAT state dict, plus its model_config.json fields."""
  rng = np.random.default_rng(seed)
  config = {"model_class": "GLM130B", "tokenizer_type": "icetk-glm-130B", "num_layers": LAYERS,
            "hidden_size": D, "num_attention_heads": heads, "vocab_size": vocab,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 64,
            "inner_hidden_size": inner}
  sd = {"transformer.word_embeddings.weight": _normal(rng, vocab, D, scale=1.0)}
  for i in range(LAYERS):
    p = f"transformer.layers.{i}"
    sd.update(_norm(rng, f"{p}.input_layernorm"))
    sd[f"{p}.attention.query_key_value.weight"] = _normal(rng, 3 * D, D)
    sd[f"{p}.attention.query_key_value.bias"] = _normal(rng, 3 * D)
    sd[f"{p}.attention.dense.weight"] = _normal(rng, D, D)
    sd[f"{p}.attention.dense.bias"] = _normal(rng, D)
    sd[f"{p}.attention.rotary_emb.inv_freq"] = np.ones(D // heads // 2, np.float32)
    sd.update(_norm(rng, f"{p}.post_attention_layernorm"))
    sd[f"{p}.mlp.dense_h_to_4h.weight"] = _normal(rng, 2 * inner, D)
    sd[f"{p}.mlp.dense_h_to_4h.bias"] = _normal(rng, 2 * inner)
    sd[f"{p}.mlp.dense_4h_to_h.weight"] = _normal(rng, D, inner)
    sd[f"{p}.mlp.dense_4h_to_h.bias"] = _normal(rng, D)
  sd.update(_norm(rng, "transformer.final_layernorm"))
  return config, sd


# --- Writers ------------------------------------------------------------------------------------

def write_config(folder, config, name="config.json"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w") as f:
    json.dump(config, f)


def save_safetensors(folder, config, sd):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  write_config(folder, config)
  save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  return str(folder)


def save_bin(folder, config, sd, shards=1):
  """pytorch_model.bin, or `shards` files plus pytorch_model.bin.index.json (save_pretrained)."""
  write_config(folder, config)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  if shards == 1:
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)
  names = list(tensors)
  weight_map = {}
  for s in range(shards):
    filename = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
    part = {n: tensors[n] for n in names[s::shards]}
    torch.save(part, os.path.join(folder, filename))
    weight_map.update({n: filename for n in part})
  with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return str(folder)


def split_tensor_parallel(sd, tp):
  """The inverse of SAT's merge, written from GLM-130B tools/convert_tp.py `merge_weights` with
  original_tp=1 (lines 78-85): GLU halves chunked into 2*tp pieces (rank r gets pieces r and
  tp+r), replicated tensors copied, the rest chunked on dim 0 (dim 1 for row-parallel)."""
  replicated = ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                "mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq",
                "final_layernorm.weight", "final_layernorm.bias")
  glu = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
  row = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
  ranks = [{} for _ in range(tp)]
  for key, value in sd.items():
    name = ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1:])
    for r in range(tp):
      if name in replicated:
        ranks[r][key] = value
      elif name in glu:
        chunks = np.split(value, 2 * tp, axis=0)
        ranks[r][key] = np.concatenate([chunks[r], chunks[tp + r]], axis=0)
      else:
        ranks[r][key] = np.split(value, tp, axis=1 if name in row else 0)[r]
  return ranks


def save_sat(folder, config, sd, tp, iteration="1000"):
  """A SAT checkpoint folder: latest, model_config.json, <iteration>/mp_rank_XX_model_states.pt."""
  write_config(folder, dict(config, model_parallel_size=tp), "model_config.json")
  with open(os.path.join(folder, "latest"), "w") as f:
    f.write(iteration)
  os.makedirs(os.path.join(folder, iteration), exist_ok=True)
  for r, part in enumerate(split_tensor_parallel(sd, tp)):
    module = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in part.items()}
    torch.save({"module": module}, os.path.join(folder, iteration, f"mp_rank_{r:02d}_model_states.pt"))
  return str(folder)
