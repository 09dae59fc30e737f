"""Published configurations at their real sizes, plus tiny ones for tests.

    presets.get("llama2-7b")           -> ModelConfig
    presets.names()                    -> sorted preset names
    dataclasses.replace(cfg, ...)      -> variants

Sources: the models' official config files (HuggingFace hub `config.json` of
gpt2, bigscience/bloom(-560m), meta-llama/Llama-2-7b-hf / 70b, THUDM/chatglm-6b,
THUDM/chatglm2-6b, THUDM/glm-10b, THUDM/glm-large) and the papers for models
without one (GLM-130B: Zeng et al. 2022, table 1 / appendix; PaLM: Chowdhery
et al. 2022, table 1). Each sets its family's `prompt_layout` (glmjax.model.config).
"""

from __future__ import annotations

import dataclasses

from glmjax.model.config import ModelConfig, llama_ffn_dim

_LLAMA = dict(norm="rmsnorm", norm_placement="pre", ffn="swiglu", position="rope",
              rope_layout="rotate_half", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
              tie_embeddings=False, prompt_layout="causal")
_GPT = dict(norm="layernorm", norm_placement="pre", ffn="gelu_tanh", qkv_bias=True,
            attn_out_bias=True, mlp_bias=True, tie_embeddings=True, prompt_layout="causal")
_GLM130B = dict(norm="layernorm", norm_placement="deepnorm", ffn="geglu", position="rope",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
                embed_grad_scale=0.1, prompt_layout="glm130b")
# ChatGLM-6B's output head is its own tensor: THUDM/chatglm-6b pytorch_model.bin.index.json lists
# `lm_head.weight` beside `transformer.word_embeddings.weight` (modeling_chatglm.py,
# ChatGLMForConditionalGeneration: `self.lm_head = skip_init(nn.Linear, ...)`), 6,707,929,088 parameters.
_CHATGLM = dict(norm="layernorm", norm_placement="deepnorm", ffn="gelu_tanh", position="rope_2d",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=False,
                prompt_layout="glm")
_CHATGLM2 = dict(norm="rmsnorm", norm_placement="pre", ffn="swiglu", position="rope",
                 rotary_fraction=0.5, rope_layout="interleaved", qkv_bias=True,
                 attn_out_bias=False, mlp_bias=False, tie_embeddings=False, prompt_layout="causal")
_GLM = dict(_GPT, position="learned_2d", prompt_layout="glm")
_BLOOM = dict(_GPT, position="alibi", embed_norm=True)
_PALM = dict(norm="layernorm", norm_bias=False, norm_placement="pre", ffn="swiglu", position="rope",
             parallel_block=True, tie_embeddings=True, prompt_layout="causal")

_PRESETS: dict[str, ModelConfig] = {
    # GLM (Du et al. 2022): BERT-style wordpiece vocab for -large, GPT-2 BPE for -10b.
    "glm-large": ModelConfig(vocab_size=30592, d_model=1024, num_layers=24, num_heads=16,
                             num_kv_heads=16, head_dim=64, ffn_dim=4096, max_length=512, **_GLM),
    "glm-10b": ModelConfig(vocab_size=50304, d_model=4096, num_layers=48, num_heads=64,
                           num_kv_heads=64, head_dim=64, ffn_dim=16384, max_length=1024, **_GLM),
    "glm-130b": ModelConfig(vocab_size=150528, d_model=12288, num_layers=70, num_heads=96,
                            num_kv_heads=96, head_dim=128, ffn_dim=32768, max_length=2048, **_GLM130B),
    "chatglm-6b": ModelConfig(vocab_size=130528, d_model=4096, num_layers=28, num_heads=32,
                              num_kv_heads=32, head_dim=128, ffn_dim=16384, max_length=2048, **_CHATGLM),
    "chatglm2-6b": ModelConfig(vocab_size=65024, d_model=4096, num_layers=28, num_heads=32,
                               num_kv_heads=2, head_dim=128, ffn_dim=13696, max_length=32768,
                               **_CHATGLM2),
    "llama-7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                            num_kv_heads=32, head_dim=128, ffn_dim=llama_ffn_dim(4096), max_length=2048,
                            norm_eps=1e-6, **_LLAMA),
    "llama2-7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=128, ffn_dim=llama_ffn_dim(4096),
                             max_length=4096, **_LLAMA),
    "llama2-70b": ModelConfig(vocab_size=32000, d_model=8192, num_layers=80, num_heads=64,
                              num_kv_heads=8, head_dim=128,
                              ffn_dim=llama_ffn_dim(8192, multiple_of=4096, multiplier=1.3),
                              max_length=4096, **_LLAMA),
    "palm-8b": ModelConfig(vocab_size=256000, d_model=4096, num_layers=32, num_heads=16,
                           num_kv_heads=1, head_dim=256, ffn_dim=16384, max_length=2048, **_PALM),
    "bloom-560m": ModelConfig(vocab_size=250880, d_model=1024, num_layers=24, num_heads=16,
                              num_kv_heads=16, head_dim=64, ffn_dim=4096, max_length=2048, **_BLOOM),
    "bloom-176b": ModelConfig(vocab_size=250880, d_model=14336, num_layers=70, num_heads=112,
                              num_kv_heads=112, head_dim=128, ffn_dim=57344, max_length=2048, **_BLOOM),
    "gpt2": ModelConfig(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        head_dim=64, ffn_dim=3072, max_length=1024, position="learned", **_GPT),
    # The peer-benchmark shape of ../shared/bench/README.md.
    "llama-small": ModelConfig(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                               head_dim=64, ffn_dim=1408, max_length=512, **_LLAMA),
}

_TINY = dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
             ffn_dim=64, max_length=64)
_PRESETS.update({
    "tiny-glm": ModelConfig(**_TINY, **_GLM),
    "tiny-glm130b": ModelConfig(**_TINY, **_GLM130B),
    "tiny-chatglm": ModelConfig(**_TINY, **_CHATGLM),
    "tiny-chatglm2": ModelConfig(**dict(_TINY, num_kv_heads=2), **_CHATGLM2),
    "tiny-llama": ModelConfig(**dict(_TINY, num_kv_heads=2), **_LLAMA),
    "tiny-palm": ModelConfig(**dict(_TINY, num_kv_heads=1), **_PALM),
    "tiny-bloom": ModelConfig(**_TINY, **_BLOOM),
    "tiny-gpt2": ModelConfig(**_TINY, position="learned", **_GPT),
    "tiny-moe": ModelConfig(**_TINY, **dict(_LLAMA, num_experts=4, experts_top_k=2)),
})


def names() -> list[str]:
  return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name`, with optional field overrides (dataclasses.replace)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(names())}")
  config = _PRESETS[name]
  return dataclasses.replace(config, **overrides) if overrides else config
