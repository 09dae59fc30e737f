"""Decoding on a mesh: params and KV cache sharded by the model's logical axes, same tokens."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from glmjax import sharding as shd
from glmjax.generate import GenerationOptions, generate
from glmjax.model import decode, presets
from tests.generate import reference

PROMPTS = [[5, 17, 33, 2, 90], [12, 64], [7], [8, 9, 10], [1, 2], [3, 4, 5, 6], [11], [13, 14]]


def test_generation_on_a_mesh_matches_one_device_and_shards_the_cache():
  config = presets.get("tiny-llama")  # 2 kv heads: split over tensor=2
  params = reference.lively_params(config, seed=2)
  options = GenerationOptions(max_new_tokens=5)
  single = generate(params, config, PROMPTS, options)

  mesh_config = shd.MeshConfig(data=4, fsdp=1, tensor=2, expert=1)
  mesh = shd.make_mesh(mesh_config)
  rules = mesh_config.rules
  sharded_params = jax.device_put(params, shd.param_shardings(config, mesh, rules))
  with shd.activation_sharding(mesh, rules):
    sharded = generate(sharded_params, config, PROMPTS, options)
    cache = jax.jit(lambda: decode.init_cache(config, len(PROMPTS), 16))()
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  # Batch over the data axis, kv heads over tensor, as the rules map the params' axes.
  assert cache.k.sharding.spec == P(None, "data", None, "tensor")
  assert cache.segment_ids.sharding.spec == P("data")
