"""Bad configs fail early with a ValueError that names the field."""

import dataclasses

import jax.numpy as jnp
import pytest

from glmjax.model import ModelConfig, forward, init_params, presets
import jax

BAD = [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(head_dim=6, rotary_fraction=0.5, position="rope"), "rotary_fraction"),
    (dict(head_dim=6, position="rope_2d"), "head_dim"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_placement="middle"), "norm_placement"),
    (dict(ffn="swish"), "ffn"),
    (dict(position="xpos"), "position"),
    (dict(rope_layout="halfhalf"), "rope_layout"),
    (dict(dtype="fp8"), "dtype"),
    (dict(remat_policy="save_everything_please"), "remat_policy"),
    (dict(d_model=0), "d_model"),
    (dict(num_experts=2, experts_top_k=3), "experts_top_k"),
    (dict(attention_impl="cudnn"), "attention_impl"),
    (dict(parallel_block=True, norm_placement="deepnorm"), "parallel_block"),
    (dict(rotary_fraction=1.5), "rotary_fraction"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
    ModelConfig(**overrides)


def test_replace_validates_too():
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(presets.get("tiny-llama"), num_kv_heads=3)


def test_sequence_longer_than_max_length():
  config = presets.get("tiny-gpt2")
  params = init_params(config, jax.random.key(0))
  tokens = jnp.zeros((1, config.max_length + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_length"):
    forward(params, {"tokens": tokens}, config)


def test_2d_model_requires_block_positions():
  config = presets.get("tiny-glm")
  params = init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="block_positions"):
    forward(params, {"tokens": jnp.zeros((1, 8), jnp.int32)}, config)
