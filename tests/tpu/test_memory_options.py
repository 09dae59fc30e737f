"""The memory options compile for a TPU topology (libtpu, no TPU) and do what they are for, in the
TPU compiler's own per-device bytes: the chunked cross-entropy holds fewer temporaries than the
dense [B, L, V] logits, host offload of the layer inputs moves them out of HBM, bfloat16 Adam
moments shrink the arguments. Only the inequalities that must hold are asserted."""

import os

import pytest

from glmjax import aot, config_gin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "experiments", "demo.gin")

# Vocabulary-heavy: 16 x 256 tokens x 32768 vocab float32 logits = 512 MiB over 4 chips against
# a 256-wide, 2-layer model (XLA attention: the Mosaic kernels have their own tests).
VOCAB_HEAVY = ["MeshConfig.data = 1", "MeshConfig.fsdp = 4", "MeshConfig.tensor = 1",
               "ModelConfig.num_layers = 2", "ModelConfig.d_model = 256", "ModelConfig.ffn_dim = 512",
               "ModelConfig.num_heads = 2", "ModelConfig.num_kv_heads = 2",
               "ModelConfig.head_dim = 128", "ModelConfig.vocab_size = 32768",
               "ModelConfig.dtype = 'bfloat16'", "ModelConfig.attention_impl = 'xla'", "ModelConfig.remat_policy = 'nothing_saveable'",
               "DataConfig.batch_size = 16", "DataConfig.sequence_length = 256",
               "ModelConfig.max_length = 511"]


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
  logits_per_chip = 16 // 4 * 256 * 32768 * 4
  assert dense["per_device_bytes"]["temporaries"] > logits_per_chip
  assert chunked["per_device_bytes"]["temporaries"] < dense["per_device_bytes"]["temporaries"]
  print("temporaries dense / chunked:", dense["per_device_bytes"]["temporaries"],
        chunked["per_device_bytes"]["temporaries"])
  assert chunked["per_device_bytes"]["arguments"] == dense["per_device_bytes"]["arguments"]


def test_offloading_the_layer_inputs_compiles_with_host_buffers():
  """'offload_layer_input' compiles for the TPU and its executable keeps buffers in host memory
  (memory space S(5), pinned_host); the HBM saving at scale is in BENCHMARKS.md (chatglm2-6b 32K
  on v5e-16: temporaries 19.40 -> 11.51 GiB)."""
  config_gin.clear()
  try:
    config_gin.parse([DEMO], VOCAB_HEAVY + ["ModelConfig.vocab_size = 1024",
                                            "ModelConfig.remat_policy = 'offload_layer_input'"])
    experiment = config_gin.build_experiment()
  finally:
    config_gin.clear()
  program = aot.train_program(experiment, aot.topology_devices("v5e:2x2"))
  with aot.no_persistent_cache():
    compiled = program.lower("train", experiment.data.sequence_length).compile()
  text = compiled.as_text()
  assert "S(5)" in text  # layouts in host memory
  layer_inputs = "[2,4,256,256]"  # layers x rows a chip x length x d_model, bf16
  assert any(layer_inputs in line and "S(5)" in line for line in text.splitlines())


def test_bfloat16_adam_moments_shrink_the_arguments(dense):
  bf16 = report("OptimizerConfig.mu_dtype = 'bfloat16'", "OptimizerConfig.nu_dtype = 'bfloat16'")
  assert bf16["memory_options"]["mu_dtype"] == "bfloat16"
  # params (f32) + two moments: 12 -> 8 bytes a parameter
  assert bf16["per_device_bytes"]["arguments"] < 0.75 * dense["per_device_bytes"]["arguments"]
