"""The batch contract module (glmjax.model.batch): host batches, id checks, the attention rule,
token accuracy; and every attention impl against a plain-numpy attention under that rule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import glmjax.pallas
from glmjax.model import batch as batch_lib
from glmjax.model import presets
from glmjax.model.transformer import default_fields
from tests.pallas import cases

LAYOUTS = cases.LAYOUTS + ("random",)


# --- to_host_batch / defaults ------------------------------------------------------------------


def test_to_host_batch_fills_defaults_in_contract_dtypes():
  tokens = [[5, 6, 7, 8], [9, 10, 11, 12]]  # Python ints: int64 once converted by numpy
  host = batch_lib.to_host_batch({"tokens": tokens, "targets": tokens, "loss_mask": [[1, 1, 0, 1]] * 2,
                                  "extra": [[0] * 4] * 2})
  assert tuple(host) == batch_lib.BATCH_KEYS  # contract keys only, in order; "extra" dropped
  for key, value in host.items():
    assert value.shape == (2, 4), key
    assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key
  np.testing.assert_array_equal(host["segment_ids"], np.ones((2, 4)))
  np.testing.assert_array_equal(host["positions"], [[0, 1, 2, 3]] * 2)
  np.testing.assert_array_equal(host["block_positions"], np.zeros((2, 4)))
  np.testing.assert_array_equal(host["bidirectional"], np.zeros((2, 4)))
  host["positions"][0, 0] = 7  # defaults are owned, writable arrays (not broadcast views)
  assert host["positions"][1, 0] == 0


def test_to_host_batch_keeps_given_fields():
  given = {"tokens": np.arange(6, dtype=np.int64).reshape(1, 6), "targets": np.ones((1, 6), np.int64),
           "loss_mask": np.ones((1, 6), bool), "segment_ids": np.array([[1, 1, 2, 2, 0, 0]]),
           "positions": np.array([[0, 1, 0, 1, 0, 0]]), "bidirectional": np.array([[True] + [False] * 5])}
  host = batch_lib.to_host_batch(given)
  for key in given:
    np.testing.assert_array_equal(host[key], given[key].astype(batch_lib.dtype_of(key)))
    assert host[key].dtype == batch_lib.dtype_of(key)
  np.testing.assert_array_equal(host["block_positions"], np.zeros((1, 6)))


def test_to_host_batch_names_missing_required_keys():
  with pytest.raises(ValueError, match=r"misses \['loss_mask'\].*DESIGN.md section 2"):
    batch_lib.to_host_batch({"tokens": [[1]], "targets": [[1]]})


def test_defaults_agree_between_numpy_jax_and_the_model():
  tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
  host = batch_lib.with_defaults({"tokens": tokens}, np)
  device = default_fields({"tokens": jnp.asarray(tokens)})
  assert set(host) == set(device) == {"tokens"} | set(batch_lib.OPTIONAL_KEYS)
  for key in batch_lib.OPTIONAL_KEYS:
    assert device[key].dtype == jnp.int32, key
    np.testing.assert_array_equal(np.asarray(device[key]), host[key])
  with pytest.raises(KeyError, match="'tokens' has no default"):
    batch_lib.default_field("tokens", (2, 5))


# --- check_ids ---------------------------------------------------------------------------------


def _id_batch(length=8, vocab=100):
  ids = np.arange(length, dtype=np.int32)[None] % vocab
  return {"tokens": ids.copy(), "targets": ids.copy(), "positions": np.arange(length, dtype=np.int32)[None],
          "block_positions": np.zeros((1, length), np.int32)}


def test_check_ids_passes_an_in_range_batch():
  batch_lib.check_ids(_id_batch(), presets.get("tiny-glm"))


@pytest.mark.parametrize("key, value", [("targets", 128), ("tokens", -1)])
def test_check_ids_names_vocab_size(key, value):
  batch = _id_batch()
  batch[key][0, 3] = value
  with pytest.raises(ValueError, match=rf"batch\['{key}'\].*ModelConfig.vocab_size=128\); set vocab_size"):
    batch_lib.check_ids(batch, presets.get("tiny-glm"))


@pytest.mark.parametrize("key", ["positions", "block_positions"])
def test_check_ids_names_max_length_for_learned_tables(key):
  config = dataclasses.replace(presets.get("tiny-glm"), max_length=8)
  batch = _id_batch()
  batch[key][0, -1] = 9  # GLM's 2D tables have max_length + 1 rows: 9 is the first id past them
  with pytest.raises(ValueError, match=rf"batch\['{key}'\] has ids in \[0, 9\], outside \[0, 9\).*ModelConfig.max_length=8"):
    batch_lib.check_ids(batch, config)


def test_check_ids_skips_tables_the_model_does_not_have():
  config = dataclasses.replace(presets.get("tiny-llama"), max_length=8)  # rope: no position table
  batch = _id_batch()
  batch["positions"][0, -1] = batch["block_positions"][0, -1] = 50
  batch_lib.check_ids(batch, config)
  del batch["targets"]  # absent keys are not checked
  batch_lib.check_ids(batch, config)


# --- the attention rule ------------------------------------------------------------------------


def _rows(seed: int, layout: str, batch: int = 3, length: int = 24):
  """(segment_ids, bidirectional) int32 [batch, length]. "random" draws ids 0..3 anywhere, so
  segments are non-contiguous and padding sits between them."""
  rng = np.random.default_rng(seed)
  if layout == "random":
    return (rng.integers(0, 4, (batch, length)).astype(np.int32),
            (rng.random((batch, length)) < 0.3).astype(np.int32))
  return cases.packed_batch(rng, batch, length, layout)


def _loop_mask(segment_ids, bidirectional):
  """DESIGN.md section 2, one pair at a time."""
  batch, length = segment_ids.shape
  mask = np.zeros((batch, length, length), bool)
  for b in range(batch):
    for i in range(length):
      for j in range(length):
        seg_i, seg_j = segment_ids[b, i], segment_ids[b, j]
        mask[b, i, j] = seg_i == seg_j != 0 and (j <= i or bool(bidirectional[b, j]))
  return mask


def _packed_mask(xp_arange, segment_ids, bidirectional):
  idx = xp_arange(segment_ids.shape[-1])
  return batch_lib.may_attend(segment_ids[:, :, None], segment_ids[:, None, :], bidirectional[:, None, :],
                              idx[None, :, None], idx[None, None, :])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_may_attend_matches_the_pairwise_rule_in_numpy_jax_and_torch(layout):
  for seed in range(3):
    seg, bidi = _rows(seed, layout)
    want = _loop_mask(seg, bidi)
    np.testing.assert_array_equal(_packed_mask(np.arange, seg, bidi), want)
    np.testing.assert_array_equal(_packed_mask(jnp.arange, jnp.asarray(seg), jnp.asarray(bidi)), want)
    np.testing.assert_array_equal(
        _packed_mask(torch.arange, torch.from_numpy(seg), torch.from_numpy(bidi).bool()).numpy(), want)
    np.testing.assert_array_equal(np.asarray(glmjax.pallas.attention_mask(seg, bidi)), want)


def test_may_attend_on_a_tile_uses_global_row_indices():
  """A kernel tile: query rows 8..11 ([4, 1] column) against keys 4..11 ([1, 8] row)."""
  seg, bidi = _rows(0, "glm", batch=1, length=16)
  q_idx, k_idx = np.arange(8, 12)[:, None], np.arange(4, 12)[None, :]
  tile = batch_lib.may_attend(seg[0, 8:12, None], seg[0, None, 4:12], bidi[0, None, 4:12], q_idx, k_idx)
  np.testing.assert_array_equal(tile, _loop_mask(seg, bidi)[0, 8:12, 4:12])


def test_decode_attention_mask_is_the_rule_on_cache_slots():
  """Queries in slots 5..7 against an 8-slot cache equal rows 5..7 of the full attention."""
  rng = np.random.default_rng(4)
  seg, bidi = _rows(2, "glm", batch=2, length=8)
  q, k, v = cases.qkv(rng, 2, 8, 4, 2, 8, jnp.float32)
  want = _numpy_attention(q, k, v, _loop_mask(seg, bidi))[:, 5:]
  got = glmjax.pallas.decode_attention(q[:, 5:], k, v, query_slots=np.arange(5, 8),
                                       query_segment_ids=seg[:, 5:], key_segment_ids=seg,
                                       key_bidirectional=bidi)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# --- every attention impl against plain numpy --------------------------------------------------


def _numpy_attention(q, k, v, mask):
  """float64 softmax attention; query head h reads kv head h // (heads / kv_heads); rows with
  no visible key give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None], scores, -np.inf)
  row_max = np.max(scores, axis=-1, keepdims=True)
  probs = np.where(mask[:, None], np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


IMPLS = [("xla", {}), ("dense", {}),
         ("pallas", dict(backend="mosaic_tpu", interpret=True, block_q=16, block_k=16)),
         ("pallas", dict(backend="triton", interpret=True, block_q=16, block_k=16))]


@pytest.mark.parametrize("impl, options", IMPLS, ids=lambda x: x if isinstance(x, str) else
                         x.get("backend", ""))
def test_every_attention_impl_follows_the_rule(impl, options):
  for index, layout in enumerate(("glm", "random")):
    rng = np.random.default_rng(index)
    seg, bidi = _rows(10 + index, layout, batch=2, length=40)
    q, k, v = cases.qkv(rng, 2, 40, 4, 2, 16, jnp.float32)
    got = glmjax.pallas.attention(q, k, v, segment_ids=jnp.asarray(seg), bidirectional=jnp.asarray(bidi),
                                  impl=impl, **options)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, _loop_mask(seg, bidi)),
                               atol=2e-5, err_msg=f"{impl} {options} {layout}")


# --- token accuracy ----------------------------------------------------------------------------


def _first_max_hits(logits, targets):
  """targets[...] == the lowest vocabulary id holding the row maximum, one row at a time."""
  rows = logits.reshape(-1, logits.shape[-1])
  first = [min(np.flatnonzero(row == row.max())) for row in rows]
  return (np.array(first).reshape(targets.shape) == targets)


def test_target_is_argmax_breaks_ties_to_the_lowest_id_in_every_namespace():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, (4, 6, 5)).astype(np.float32)  # many tied maxima
  targets = rng.integers(0, 5, (4, 6))
  want = _first_max_hits(logits, targets)
  assert want.any() and not want.all()
  tied_wrong = (np.take_along_axis(logits, targets[..., None], -1)[..., 0] == logits.max(-1)) & ~want
  assert tied_wrong.any()  # targets tied with a lower id count as wrong
  np.testing.assert_array_equal(batch_lib.target_is_argmax(logits, targets), want)
  np.testing.assert_array_equal(np.asarray(batch_lib.target_is_argmax(jnp.asarray(logits),
                                                                      jnp.asarray(targets))), want)
  np.testing.assert_array_equal(batch_lib.target_is_argmax(torch.from_numpy(logits),
                                                           torch.from_numpy(targets)).numpy(), want)
  jitted = jax.jit(batch_lib.target_is_argmax)(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_array_equal(np.asarray(jitted), want)
