"""The flash kernel under a multi-device mesh runs per shard (shard_map), same numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glmjax import model, sharding
from glmjax.pallas import flash_triton
from glmjax.pallas.partitioning import attention_specs


@pytest.fixture()
def small_blocks(monkeypatch):
  monkeypatch.setattr(flash_triton, "DEFAULT_BLOCK_Q", 16)
  monkeypatch.setattr(flash_triton, "DEFAULT_BLOCK_K", 16)


def _batch(config, batch_size=4, length=32):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, config.vocab_size, size=(batch_size, length)).astype(np.int32)
  seg = np.ones((batch_size, length), np.int32)
  seg[:, 20:] = 2
  seg[1, 28:] = 0
  bidi = np.zeros((batch_size, length), np.int32)
  bidi[:, :8] = 1
  pos = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(batch_size, 0).astype(np.int32)
  return {"tokens": tokens, "segment_ids": seg, "bidirectional": bidi, "positions": pos,
          "block_positions": np.zeros_like(pos)}


@pytest.mark.parametrize("name", ["tiny-chatglm2", "tiny-bloom"])
def test_sharded_pallas_matches_single_device(name, small_blocks):
  config = dataclasses.replace(model.presets.get(name), attention_impl="pallas")
  params = model.init_params(config, jax.random.key(0))
  batch = _batch(config)
  want = model.forward(params, batch, config)

  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.DEFAULT_RULES
  fn = jax.jit(lambda p, b: model.forward(p, b, config),
               in_shardings=(sharding.param_shardings(config, mesh, rules),
                             NamedSharding(mesh, P(("data", "fsdp")))))
  with sharding.activation_sharding(mesh, rules):
    jaxpr = str(jax.make_jaxpr(lambda p, b: model.forward(p, b, config))(params, batch))
    got = fn(params, batch)
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_specs_keep_gqa_groups_whole():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"))
  q, kv, mask, slopes = attention_specs((4, 32, 8, 16), (4, 32, 2, 16), mesh, rules)
  assert q == P(("data", "fsdp"), None, "tensor", None) and kv == q and mask == P(("data", "fsdp"), None)
  # MQA: one kv head cannot be split, so heads stay whole on every device.
  q, kv, _, slopes = attention_specs((4, 32, 8, 16), (4, 32, 1, 16), mesh, rules)
  assert q == P(("data", "fsdp"), None, None, None) and slopes == P(None)
  # A batch that does not divide the batch axes is replicated rather than mis-split.
  q, _, _, _ = attention_specs((3, 32, 8, 16), (3, 32, 8, 16), mesh, rules)
  assert q[0] is None
