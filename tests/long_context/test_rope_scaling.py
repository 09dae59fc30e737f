"""RoPE scaling by name: each kind against its published formula (NumPy float64, written here
from the papers / reference code) and transformers' ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding,
including position 100K in float32; LLaMA / GLM-4 export with scaling gives transformers' logits,
and import reads the scaling back from config.json."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.export import from_huggingface, to_huggingface
from glmjax.model import ModelConfig, layers, rope_scaling
from tests.export import helpers

HEAD = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
            ffn_dim=48, norm="rmsnorm", ffn="swiglu", position="rope")
CASES = {
    "linear": dict(rope_scaling="linear", rope_scaling_factor=4.0, rope_theta=10000.0),
    "ntk": dict(rope_scaling="ntk", rope_scaling_factor=8.0, rope_theta=10000.0),
    "yarn": dict(rope_scaling="yarn", rope_scaling_factor=16.0, rope_original_length=4096,
                 rope_theta=10000.0),
    "yarn_partial_factor": dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_length=8192,
                                rope_theta=500000.0, rope_beta_fast=16.0, rope_beta_slow=2.0,
                                rope_attention_factor=1.25, rotary_fraction=0.5),
    "llama3": dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_length=8192,
                   rope_theta=500000.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
}
LONG_POSITIONS = np.array([0, 1, 17, 4095, 8191, 65535, 100000], np.int32)


def config_of(name, **overrides):
  fields = dict(HEAD, **CASES[name])
  original = fields.get("rope_original_length") or 8192
  fields.setdefault("max_length", int(original * fields["rope_scaling_factor"]))
  fields.update(overrides)
  return ModelConfig(**fields)


# --- Published formulas, float64 NumPy -------------------------------------------------------

def numpy_inv_freq(c: ModelConfig) -> np.ndarray:
  d, b, s, L = c.rotary_dim, c.rope_theta, c.rope_scaling_factor, c.rope_original_length
  i = np.arange(0, d, 2, dtype=np.float64)
  theta = b ** (-i / d)
  if c.rope_scaling == "linear":  # Chen et al. 2023 eq. 4: f(x, m L / L')
    return theta / s
  if c.rope_scaling == "ntk":  # YaRN eq. 13: b' = b s^(|D| / (|D| - 2))
    return (b * s ** (d / (d - 2))) ** (-i / d)
  if c.rope_scaling == "yarn":  # jquesnelle/yarn scaled_rope: find_correction_range + linear ramp
    def dim(rot):
      return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(b))
    low = max(math.floor(dim(c.rope_beta_fast)), 0)
    high = min(math.ceil(dim(c.rope_beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    return theta / s * ramp + theta * (1 - ramp)
  if c.rope_scaling == "llama3":  # Meta llama-models apply_scaling, a loop over frequencies
    out = []
    for freq in theta:
      wavelen = 2 * math.pi / freq
      if wavelen < L / c.rope_high_freq_factor:
        out.append(freq)
      elif wavelen > L / c.rope_low_freq_factor:
        out.append(freq / s)
      else:
        smooth = (L / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
        out.append((1 - smooth) * freq / s + smooth * freq)
    return np.array(out)
  return theta


def numpy_attention_factor(c: ModelConfig) -> float:
  if c.rope_scaling != "yarn":
    return 1.0
  return c.rope_attention_factor or 0.1 * math.log(c.rope_scaling_factor) + 1  # YaRN eq. 22


@pytest.mark.parametrize("name", sorted(CASES))
def test_inv_freq_and_long_angles_equal_the_published_formula(name):
  c = config_of(name)
  expected = numpy_inv_freq(c)
  got = np.asarray(rope_scaling.inv_freq(c), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
  assert rope_scaling.attention_factor(c) == pytest.approx(numpy_attention_factor(c), rel=1e-12)
  # Float32 angles at 100K stay within float32 rounding of the exact products.
  angles = np.asarray(rope_scaling.rope_angles(jnp.asarray(LONG_POSITIONS[None]), c))[0]
  np.testing.assert_allclose(angles, LONG_POSITIONS[:, None] * expected[None], rtol=1e-6, atol=0)


def test_scaling_changes_only_what_it_should():
  plain = config_of("linear", rope_scaling="none", rope_scaling_factor=1.0)
  np.testing.assert_array_equal(np.asarray(rope_scaling.inv_freq(plain)),
                                np.asarray(layers.rope_inv_freq(plain.rotary_dim, plain.rope_theta)))
  llama3 = config_of("llama3")
  inv, base = np.asarray(rope_scaling.inv_freq(llama3)), np.asarray(layers.rope_inv_freq(16, 500000.0))
  assert inv[0] == base[0] and inv[-1] == pytest.approx(base[-1] / 8, rel=1e-6)  # kept / divided bands
  ntk = config_of("ntk")
  ntk_inv = np.asarray(rope_scaling.inv_freq(ntk))
  assert ntk_inv[0] == 1.0 and ntk_inv[-1] == pytest.approx(
      np.asarray(layers.rope_inv_freq(16, 10000.0))[-1] / 8, rel=1e-5)  # lowest frequency / s


def test_chatglm_rope_ratio_is_base_times_ratio():
  """THUDM chatglm3-6b-32k / glm-4-9b-chat-1m modeling_chatglm.py RotaryEmbedding.forward_impl:
  base = base * self.rope_ratio; theta = 1 / (base ** (arange(0, n_elem, 2) / n_elem))."""
  import torch  # pylint: disable=import-outside-toplevel
  for ratio in (1.0, 50.0, 500.0):
    n_elem, base = 64, 10000 * ratio
    reference = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    c = ModelConfig(**dict(HEAD, head_dim=128, rotary_fraction=0.5, rope_layout="interleaved",
                           rope_theta=rope_scaling.chatglm_rope_theta(ratio), max_length=32768))
    np.testing.assert_allclose(np.asarray(rope_scaling.inv_freq(c)), reference.numpy(), rtol=1e-6)


# --- transformers ----------------------------------------------------------------------------

def hf_llama_config(c: ModelConfig):
  import transformers  # pylint: disable=import-outside-toplevel
  params = dict(rope_scaling.to_hf(c), partial_rotary_factor=c.rotary_fraction)
  return transformers.LlamaConfig(hidden_size=c.d_model, num_attention_heads=c.num_heads,
                                  head_dim=c.head_dim, max_position_embeddings=c.max_length,
                                  rope_parameters=params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_transformers_rope_init_functions_and_rotary_at_100k(name):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=import-outside-toplevel
  from transformers.models.llama import modeling_llama  # pylint: disable=import-outside-toplevel
  c = config_of(name)
  if c.rope_scaling == "ntk":
    # transformers' "dynamic" NTK uses b (s n / L - (s - 1))^(d/(d-2)); at n = L (2s - 1) / s the
    # running factor is s, the static NTK-aware base.
    L = 1000
    hf = hf_llama_config(config_of(name, rope_scaling="none", rope_scaling_factor=1.0, max_length=L))
    hf.rope_parameters.update(rope_type="dynamic", factor=c.rope_scaling_factor)
    n = L * (2 * c.rope_scaling_factor - 1) / c.rope_scaling_factor
    inv, factor = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=n)
  else:
    hf = hf_llama_config(c)
    inv, factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
  np.testing.assert_allclose(np.asarray(rope_scaling.inv_freq(c)), inv.numpy(), rtol=2e-7)
  assert rope_scaling.attention_factor(c) == pytest.approx(factor, rel=1e-12)

  # What the attention sees: q rotated by glmjax vs LlamaRotaryEmbedding + apply_rotary_pos_emb.
  rotary = modeling_llama.LlamaRotaryEmbedding(hf_llama_config(c))
  rng = np.random.default_rng(0)
  q = rng.standard_normal((1, len(LONG_POSITIONS), 1, c.head_dim)).astype(np.float32)  # [B, L, H, D]
  positions = torch.tensor(LONG_POSITIONS[None], dtype=torch.long)
  cos, sin = rotary(torch.tensor(q), positions)
  rot = c.rotary_dim
  q_t = torch.tensor(q).transpose(1, 2)  # [B, H, L, D]
  q_rot, _ = modeling_llama.apply_rotary_pos_emb(q_t[..., :rot], q_t[..., :rot], cos, sin)
  expected = torch.cat([q_rot, q_t[..., rot:]], dim=-1).transpose(1, 2).numpy()
  angles = rope_scaling.rope_angles(jnp.asarray(LONG_POSITIONS[None]), c)
  got = np.asarray(layers.apply_rope(jnp.asarray(q), angles, "rotate_half",
                                     rope_scaling.attention_factor(c)))
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


EXPORTS = {
    "llama_llama3": ("LlamaForCausalLM", "llama3", {}),
    "llama_linear": ("LlamaForCausalLM", "linear", dict(num_kv_heads=1)),
    "llama_ntk": ("LlamaForCausalLM", "ntk", {}),
    "glm4_yarn_partial": ("GlmForCausalLM", "yarn_partial_factor",
                          dict(rope_layout="interleaved", qkv_bias=True)),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_gives_transformers_logits_and_import_reads_the_scaling(case, tmp_path):
  architecture, name, overrides = EXPORTS[case]
  # Short originals so the scaled bands fall inside a 16-token test sequence's frequencies.
  c = config_of(name, **dict(overrides, max_length=64))
  if c.rope_original_length:
    c = config_of(name, **dict(overrides, rope_original_length=16, max_length=int(16 * c.rope_scaling_factor)))
  params = helpers.perturbed_params(c, seed=len(case))
  out = str(tmp_path / case)
  assert to_huggingface(params, c, out, target="native").architecture == architecture
  tokens = helpers.random_tokens(c.vocab_size, shape=(2, 16))
  diff = np.abs(helpers.jax_logits(params, c, tokens) - helpers.hf_logits(out, tokens)).max()
  assert diff <= helpers.TOLERANCE, f"{case}: max |logits diff| = {diff}"
  _, stored = from_huggingface(out)
  assert stored == c
  _, read = from_huggingface(out, use_stored_config=False)
  if name == "ntk":  # written as plain RoPE with the NTK base: the same function
    assert read.rope_scaling == "none"
    assert read.rope_theta == pytest.approx(rope_scaling.ntk_theta(10000.0, 8.0, 16), rel=1e-12)
  else:
    scaling = [f for f in vars(c) if f.startswith("rope_")]
    assert {f: getattr(read, f) for f in scaling} == {f: getattr(c, f) for f in scaling}


def test_targets_without_scaling_refuse_it():
  from glmjax.export import targets  # pylint: disable=import-outside-toplevel
  c = ModelConfig(**dict(HEAD, norm="layernorm", norm_bias=False, parallel_block=True, num_kv_heads=1,
                         rope_scaling="linear", rope_scaling_factor=2.0))
  assert any(item.startswith("ModelConfig.rope_scaling='linear'") for item in targets.Cohere().blockers(c))


@pytest.mark.parametrize("fields, message", [
    (dict(rope_scaling="longrope"), "ModelConfig.rope_scaling: 'longrope' is not one of"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0), "ModelConfig.rope_original_length:"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.5), "ModelConfig.rope_scaling_factor:"),
    (dict(rope_scaling="linear", rope_scaling_factor=2.0, position="alibi"), "ModelConfig.rope_scaling:"),
    (dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_length=64,
          rope_low_freq_factor=4.0), "ModelConfig.rope_high_freq_factor:"),
    (dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_length=64, rope_beta_fast=0.5),
     "ModelConfig.rope_beta_fast:"),
])
def test_bad_scaling_config_is_one_line(fields, message):
  with pytest.raises(ValueError) as err:
    ModelConfig(**dict(HEAD, **fields))
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("rope_parameters, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "mscale": 0.7},
     "rope_parameters.mscale"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "truncate": False},
     "truncate=False"),
])
def test_import_refuses_scalings_it_cannot_compute(rope_parameters, message):
  with pytest.raises(ValueError, match=message):
    rope_scaling.from_hf(rope_parameters)
