"""The memory options compile for a TPU topology (libtpu, no TPU) and do what they are for, in the
TPU compiler's own per-device bytes: the chunked cross-entropy holds fewer temporaries than the
dense [B, L, V] logits, host offload of the layer inputs moves them out of HBM, bfloat16 Adam
moments shrink the arguments. Only the inequalities that must hold are asserted."""

import os

import pytest

from glmjax import aot, config_gin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "experiments", "demo.gin")

# Vocabulary-heavy: 16 x 512 tokens x 32768 vocab float32 logits = 1 GiB over
# 4 chips against a 256-wide, 4-layer model.
VOCAB_HEAVY = ["MeshConfig.data = 1", "MeshConfig.fsdp = 4", "MeshConfig.tensor = 1",
               "ModelConfig.num_layers = 4", "ModelConfig.d_model = 256", "ModelConfig.ffn_dim = 512",
               "ModelConfig.num_heads = 2", "ModelConfig.num_kv_heads = 2",
               "ModelConfig.head_dim = 128", "ModelConfig.vocab_size = 32768",
               "ModelConfig.dtype = 'bfloat16'", "ModelConfig.remat_policy = 'nothing_saveable'",
               "DataConfig.batch_size = 16", "DataConfig.sequence_length = 512",
               "ModelConfig.max_length = 1023"]


def report(*extra):
  config_gin.clear()
  try:
    config_gin.parse([DEMO], VOCAB_HEAVY + list(extra))
    experiment = config_gin.build_experiment()
  finally:
    config_gin.clear()
  return aot.compile_report(experiment, "v5e:2x2")


@pytest.fixture(scope="module")
def dense():
  return report()


def test_chunked_loss_holds_fewer_temporaries_than_dense_logits(dense):
  chunked = report("ModelConfig.loss_impl = 'chunked'", "ModelConfig.loss_chunk_size = 128")
  assert chunked["fits"] and dense["fits"]
  assert chunked["memory_options"]["loss_impl"] == "chunked"
  logits_per_chip = 16 // 4 * 512 * 32768 * 4
  assert dense["per_device_bytes"]["temporaries"] > logits_per_chip
  assert chunked["per_device_bytes"]["temporaries"] < dense["per_device_bytes"]["temporaries"]
  assert chunked["per_device_bytes"]["arguments"] == dense["per_device_bytes"]["arguments"]


def test_offloading_the_layer_inputs_compiles_and_lowers_hbm_temporaries():
  base = report("ModelConfig.loss_impl = 'chunked'")
  offload = report("ModelConfig.loss_impl = 'chunked'",
                   "ModelConfig.remat_policy = 'offload_layer_input'")
  assert offload["memory_options"]["remat_policy"] == "offload_layer_input"
  assert offload["per_device_bytes"]["temporaries"] < base["per_device_bytes"]["temporaries"]


def test_bfloat16_adam_moments_shrink_the_arguments(dense):
  bf16 = report("OptimizerConfig.mu_dtype = 'bfloat16'", "OptimizerConfig.nu_dtype = 'bfloat16'")
  assert bf16["memory_options"]["mu_dtype"] == "bfloat16"
  # params (f32) + two moments: 12 -> 8 bytes a parameter
  assert bf16["per_device_bytes"]["arguments"] < 0.75 * dense["per_device_bytes"]["arguments"]
