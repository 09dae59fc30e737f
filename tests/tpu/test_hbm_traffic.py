"""The roofline's HBM term (`glmjax.aot.hbm_traffic`) against the formula worked by hand for a tiny
config: d_model 32, 2 layers, 4 query heads and 2 kv heads of 8, a SwiGLU MLP of 64, vocab 128."""

import dataclasses

import pytest

from glmjax import aot
from tests.train.helpers import tiny_model

# 8 sequences of 16 tokens on 4 devices, tensor 2 (fsdp 2): 8 * 16 / (4 / 2) = 64 tokens a device.
TOKENS = 64
COMMON = dict(batch=8, length=16, num_devices=4, model_shards=2, param_count=1000,
              matmul_param_count=900, param_bytes=4, state_bytes_per_device=2000.0)


def config(**overrides):
  base = dataclasses.replace(tiny_model(), vocab_size=128, dtype="bfloat16", param_dtype="float32",
                             remat_policy="nothing_saveable", loss_impl="dense")
  return dataclasses.replace(base, **overrides)


def test_full_remat_train_step_terms_equal_the_hand_computation():
  terms = aot.hbm_traffic(config(), "train", **COMMON)
  weights = 3 * 900 * 2 / 2  # forward, remat forward, backward; bf16; split over tensor 2
  update = 1000 / 4 * (4 + 4 + 4 + 4) + 2 * 2000  # params r+w, grads w+r, Adam state r+w
  activations = 2 * 2 * TOKENS * 32 * 2  # 2 layers' inputs [64, 32] bf16, written + read
  logits = 4 * TOKENS * 128 / 2 * 4  # float32 logits and their gradient, written + read, vocab / 2
  assert terms == pytest.approx({"weights": weights, "update": update, "activations": activations,
                                 "logits": logits,
                                 "total": weights + update + activations + logits}, rel=1e-12)


@pytest.mark.parametrize("policy, passes, width", [
    ("save_qkv_proj", 3, 32 + 4 * 8 + 2 * 8 + 2 * 8),  # layer input + q + k + v
    ("offload_layer_input", 3, 32),  # the layer input, through HBM to the host and back
    ("save=attention_out;offload=mlp_out", 3, 32 + 4 * 8 + 32),
    # every projection output: the tags (32 + 32 + 16 + 16 + 32 + 32 + 32) and SwiGLU's 2 x 64
    ("dots_with_no_batch_dims_saveable", 2, 192 + 2 * 64),
])
def test_remat_policies_change_the_weight_passes_and_the_saved_activations(policy, passes, width):
  terms = aot.hbm_traffic(config(remat_policy=policy), "train", **COMMON)
  assert terms["weights"] == passes * 900 * 2 / 2
  assert terms["activations"] == 2 * 2 * TOKENS * width * 2


def test_chunked_loss_recomputes_the_logits_and_pipeline_stages_split_the_layers():
  chunked = aot.hbm_traffic(config(loss_impl="chunked", loss_chunk_size=8), "train", **COMMON)
  assert chunked["logits"] == 6 * TOKENS * 128 / 2 * 4
  # stage 2 x tensor 1 on the same 4 devices: weights split over stages, one layer each
  staged = aot.hbm_traffic(config(), "train", **{**COMMON, "stages": 2})
  assert staged["weights"] == 3 * 900 * 2 / 2
  assert staged["activations"] == 2 * 1 * TOKENS * 32 * 2
  assert staged["logits"] == 4 * TOKENS * 128 * 4  # vocab whole: no tensor axis
  # 4 microbatches read the weights 4 times; the tokens (and so the other terms) are the same
  micro = aot.hbm_traffic(config(), "train", **{**COMMON, "microbatches": 4})
  plain = aot.hbm_traffic(config(), "train", **COMMON)
  assert micro["weights"] == 4 * plain["weights"]
  assert (micro["activations"], micro["logits"]) == (plain["activations"], plain["logits"])


def test_eval_and_decode_terms():
  ev = aot.hbm_traffic(config(), "eval", **COMMON)
  assert ev == {"weights": 900.0, "logits": 2 * TOKENS * 128 / 2 * 4, "total": 900.0 + 32768.0}
  dec = aot.hbm_traffic(config(), "decode", **{**COMMON, "kv_cache_bytes": 4096.0})
  assert dec["weights"] == 900 * 2 / 2 + 1000 * 4 / 4  # bf16 matmul reads + the stored params
  assert dec["kv_cache"] == 4096.0 / 4
  assert dec["logits"] == 8 * 128 * 4 / 4
  assert dec["total"] == dec["weights"] + dec["kv_cache"] + dec["logits"]


def test_roofline_takes_the_hbm_term_from_the_traffic():
  chip = aot.TPU_CHIPS["TPU v5 lite"]
  roof = aot.roofline(197e12 * 4 * 0.5, 4, chip, hbm_bytes=819e9 * 2.0, collectives={})
  assert roof["compute_s"] == pytest.approx(0.5) and roof["hbm_s"] == pytest.approx(2.0)
  assert roof["bound_by"] == "hbm" and roof["mfu_bound"] == pytest.approx(0.25)
