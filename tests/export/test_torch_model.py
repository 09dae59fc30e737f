"""The torch reference model (glmjax.export.torch_model) against glmjax.model.forward.

Architectures no transformers class represents go through it: GLM with learned
2D positions, ChatGLM-6B (2D RoPE + DeepNorm), GLM-130B (DeepNorm + GeGLU),
sandwich LayerNorm, capacity-limited MoE, post-LN with sinusoidal positions and
an lm-head bias, RMSNorm parallel blocks with ALiBi. The inputs are full GLM
batches (packing, Part A bidirectional, Part B positions, padding), so the
torch model honours the whole batch contract, not only plain causal rows.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from glmjax.export import from_huggingface, to_huggingface
from glmjax.export import torch_model
from glmjax.export.torch_model import GLMJaxConfig, GLMJaxForCausalLM
from glmjax.model import ModelConfig
from glmjax.model.batch import may_attend
from tests.export import helpers
from tests.pallas import cases

BASE = dict(vocab_size=83, d_model=40, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=12,
            ffn_dim=56, max_length=24)

CASES = {
    "glm_learned_2d": dict(BASE, position="learned_2d", ffn="gelu_tanh", qkv_bias=True,
                           attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
    "chatglm6b_rope_2d_deepnorm": dict(BASE, position="rope_2d", norm_placement="deepnorm",
                                       ffn="gelu_tanh", qkv_bias=True, attn_out_bias=True,
                                       mlp_bias=True, num_kv_heads=2),
    "glm130b_deepnorm_geglu": dict(BASE, position="rope", norm_placement="deepnorm", ffn="geglu",
                                   qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                                   tie_embeddings=True, rotary_fraction=0.5),
    "sandwich_layernorm_learned": dict(BASE, position="learned", norm_placement="sandwich",
                                       ffn="gelu", mlp_bias=True),
    "moe_capacity_overflow": dict(BASE, position="rope", norm="rmsnorm", ffn="swiglu",
                                  num_experts=4, experts_top_k=2, expert_capacity_factor=0.5,
                                  mlp_bias=True, num_kv_heads=2),
    "post_ln_sinusoidal_head_bias": dict(BASE, position="sinusoidal", norm_placement="post",
                                         ffn="relu", lm_head_bias=True, norm_bias=False),
    "rmsnorm_parallel_alibi_embed_norm": dict(BASE, position="alibi", norm="rmsnorm",
                                              parallel_block=True, parallel_shared_norm=False,
                                              ffn="silu", embed_norm=True, num_heads=5,
                                              num_kv_heads=5),
}


def glm_batch(vocab_size: int) -> dict:
  """Two packed rows of 16: GLM Part A (bidirectional) + Part B (repeated positions, block
  positions 1..4) + a causal segment + padding; then a causal and a bidirectional segment."""
  tokens = helpers.random_tokens(vocab_size, (2, 16), seed=3)
  segment_ids = np.array([[1] * 9 + [2] * 4 + [0] * 3, [1] * 10 + [2] * 6], np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 2, 2, 2, 2, 0, 1, 2, 3, 0, 0, 0],
                        list(range(10)) + list(range(6))], np.int32)
  block_positions = np.array([[0] * 5 + [1, 2, 3, 4] + [0] * 7, [0] * 16], np.int32)
  bidirectional = np.array([[1] * 5 + [0] * 11, [0] * 10 + [1] * 6], np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "block_positions": block_positions, "bidirectional": bidirectional}


def torch_logits(model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits.numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_model_matches_forward_and_round_trips(name, tmp_path):
  config = ModelConfig(**CASES[name])
  params = helpers.perturbed_params(config, seed=len(name))
  out = str(tmp_path / name)
  result = to_huggingface(params, config, out)
  assert result.target == "torch" and result.architecture == "GLMJaxForCausalLM"

  batch = glm_batch(config.vocab_size)
  tokens = batch.pop("tokens")
  expected = helpers.jax_logits(params, config, tokens, **batch)
  model = GLMJaxForCausalLM.from_pretrained(out)
  diff = np.abs(expected - torch_logits(model, {"tokens": tokens, **batch})).max()
  assert diff <= helpers.TOLERANCE, f"{name}: max |logits diff| = {diff}"

  imported, imported_config = from_huggingface(out)
  assert imported_config == config
  assert helpers.leaves_equal(imported, params)


def test_moe_case_really_drops_tokens(tmp_path):
  """The capacity rule is exercised: with room for every token the logits change."""
  config = ModelConfig(**CASES["moe_capacity_overflow"])
  params = helpers.perturbed_params(config)
  to_huggingface(params, config, str(tmp_path))
  batch = glm_batch(config.vocab_size)
  tight = GLMJaxForCausalLM.from_pretrained(str(tmp_path))
  roomy = GLMJaxForCausalLM(GLMJaxConfig.from_dict(
      dict(CASES["moe_capacity_overflow"], expert_capacity_factor=100.0)))
  roomy.load_state_dict(tight.state_dict())
  assert np.abs(torch_logits(tight, batch) - torch_logits(roomy, batch)).max() > 1e-3


def test_exported_folder_runs_with_torch_alone(tmp_path):
  """The copied modeling_glmjax.py loads and runs in a process where jax, glmjax and transformers
  cannot be imported (torch and safetensors only), and gives glmjax's logits."""
  config = ModelConfig(**CASES["chatglm6b_rope_2d_deepnorm"])
  params = helpers.perturbed_params(config)
  out = tmp_path / "model"
  to_huggingface(params, config, str(out), max_shard_size=20_000)
  assert (out / "model.safetensors.index.json").exists()
  tokens = helpers.random_tokens(config.vocab_size, (1, 9))
  np.save(tmp_path / "tokens.npy", tokens)
  np.save(tmp_path / "expected.npy", helpers.jax_logits(params, config, tokens))
  script = textwrap.dedent(f"""
      import sys
      for blocked in ("jax", "jaxlib", "glmjax", "transformers"):
        sys.modules[blocked] = None
      sys.path.insert(0, {str(out)!r})
      import numpy as np, torch
      from modeling_glmjax import GLMJaxForCausalLM
      model = GLMJaxForCausalLM.from_pretrained({str(out)!r})
      tokens = torch.tensor(np.load({str(tmp_path / 'tokens.npy')!r}), dtype=torch.long)
      with torch.no_grad():
        logits = model(tokens, block_positions=torch.zeros_like(tokens)).logits.numpy()
      diff = np.abs(logits - np.load({str(tmp_path / 'expected.npy')!r})).max()
      print("DIFF", diff)
      sys.exit(0 if diff <= {helpers.TOLERANCE} else 1)
  """)
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
  assert run.returncode == 0, run.stdout + run.stderr


def test_torch_model_module_does_not_import_jax():
  script = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None; "
            "import glmjax.export.torch_model as m; print(m.GLMJaxForCausalLM.__name__)")
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0 and "GLMJaxForCausalLM" in run.stdout, run.stderr


@pytest.mark.parametrize("layout", ["glm", "causal", "bidirectional", "scattered", "random"])
def test_torch_mask_is_the_batch_contract_rule(layout):
  """torch_model ships alone, so it keeps a copy of glmjax.model.batch.may_attend; both masks
  agree on packed rows (segments, padding, bidirectional prefixes or scattered tokens)."""
  for seed in range(4):
    rng = np.random.default_rng(seed)
    if layout == "random":
      seg = rng.integers(0, 4, (3, 20)).astype(np.int32)
      bidi = (rng.random((3, 20)) < 0.3).astype(np.int32)
    else:
      seg, bidi = cases.packed_batch(rng, 3, 20, layout)
    idx = np.arange(20)
    want = may_attend(seg[:, :, None], seg[:, None, :], bidi[:, None, :], idx[None, :, None],
                      idx[None, None, :])
    got = torch_model.attention_mask(torch.from_numpy(seg).long(), torch.from_numpy(bidi).long())
    np.testing.assert_array_equal(got.numpy(), want)
    got_bool = torch_model.attention_mask(torch.from_numpy(seg), torch.from_numpy(bidi).bool())
    np.testing.assert_array_equal(got_bool.numpy(), want)
