"""`glmjax compile`: the train step compiled ahead of time for real TPU topologies (libtpu, no TPU).

The argument bytes the TPU compiler reports are checked against the sharded params + Adam state
computed here from `param_specs` and the default rules, by hand.
"""

import json
import math
import os

import jax
import numpy as np

from glmjax import cli, config_gin
from glmjax.model import is_spec, param_specs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "experiments", "demo.gin")

# A small GLM whose sharded arrays are (nearly all) whole (8, 128) float32 TPU tiles on fsdp=2 x
# tensor=2; the learned position tables have max_length + 1 = 257 rows, padded to 264 on the chip.
SMALL_GLM = ["MeshConfig.data = 1", "MeshConfig.fsdp = 2", "MeshConfig.tensor = 2",
             "ModelConfig.num_layers = 8", "ModelConfig.d_model = 256", "ModelConfig.ffn_dim = 256",
             "ModelConfig.num_heads = 16", "ModelConfig.num_kv_heads = 16",
             "ModelConfig.head_dim = 128", "ModelConfig.vocab_size = 1024",
             "DataConfig.batch_size = 16", "DataConfig.sequence_length = 128",
             # GLM's 2D position tables have max_length + 1 rows: 256, whole (8, 128) tiles, so the
             # hand count below needs no guess at how XLA pads an odd row count.
             "ModelConfig.max_length = 255"]
MESH = {"fsdp": 2, "tensor": 2}
RULE = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def run_cli(argv):
  config_gin.clear()
  try:
    return cli.main(list(argv))
  finally:
    config_gin.clear()


def compile_args(bindings, *extra):
  return ["compile", "--gin_file", DEMO] + [a for b in bindings for a in ("--gin", b)] + list(extra)


def tiled_bytes(shape, itemsize: int = 4) -> int:
  """A 32-bit array's bytes in TPU HBM: the two minor dims in whole (8, 128) tiles."""
  shape = list(shape)
  if shape:
    shape[-1] = -(-shape[-1] // 128) * 128
  if len(shape) >= 2:
    shape[-2] = -(-shape[-2] // 8) * 8
  return math.prod(shape) * itemsize


def hand_param_bytes_per_device(model_config) -> int:
  """Sum over params of the shard's bytes: each dim divided by the mesh parts of the axis its
  logical name maps to (a mesh axis shards at most one dim of an array: the first logical axis
  mapped to it), in (8, 128) tiles."""
  total = 0
  for spec in jax.tree_util.tree_leaves(param_specs(model_config), is_leaf=is_spec):
    used, shard = set(), list(spec.shape)
    for dim, axis in enumerate(spec.axes):
      mesh_axis = RULE.get(axis)
      if mesh_axis and mesh_axis not in used:
        used.add(mesh_axis)
        assert shard[dim] % MESH[mesh_axis] == 0
        shard[dim] //= MESH[mesh_axis]
    assert np.dtype(spec.dtype).itemsize == 4
    total += tiled_bytes(shard)
  return total


def matmul_params(cfg) -> int:
  """All params but the learned position tables (GLM ties the embedding: it is the output matmul)."""
  assert cfg.tie_embeddings
  specs = param_specs(cfg)
  lookup = sum(math.prod(s.shape) for name, s in specs["embed"].items() if name != "embedding")
  return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec)) - lookup


def small_model_config():
  config_gin.clear()
  try:
    config_gin.parse([DEMO], SMALL_GLM)
    return config_gin.build_experiment().model
  finally:
    config_gin.clear()


def test_small_glm_on_v5e_2x2_fits_and_argument_bytes_match_param_specs(tmp_path, capfd):
  out = tmp_path / "report.json"
  assert run_cli(compile_args(SMALL_GLM, "--topology", "v5e:2x2", "--json", str(out))) == 0
  captured = capfd.readouterr()
  assert "does NOT fit" not in captured.out and "fits" in captured.out
  assert "TPU" not in captured.err and "Failed to find host bounds" not in captured.err
  report = json.loads(out.read_text())
  assert report["fits"] is True and report["num_devices"] == 4
  assert report["device_kind"] == "TPU v5 lite"
  assert report["hbm_bytes_per_device"] == int(15.75 * 1024**3)

  params = hand_param_bytes_per_device(small_model_config())
  # train state: params + Adam mu + nu (param dtype, param sharding) and 6 scalars (step, rng,
  # two non-finite counters, Adam's and the schedule's counts), each the TPU's 512-byte minimum
  state = 3 * params + 6 * 512
  batch = 7 * (16 // 2) * 128 * 4  # 7 int32/float32 [batch, length] fields, batch split by fsdp
  mem = report["per_device_bytes"]
  assert mem["arguments"] == state + batch
  assert mem["aliased"] == state  # the donated state is updated in place
  assert mem["peak"] == (mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"]
                         + mem["generated_code"])
  assert mem["peak"] <= report["hbm_bytes_per_device"]

  assert report["compile_s"] > 0
  # 6N + attention per token (N: matmul params, all but the learned position tables) x tokens
  cfg = small_model_config()
  n = matmul_params(cfg)
  tokens = 16 * 128
  expected = (6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128) * tokens
  assert math.isclose(report["flops_per_step"], expected, rel_tol=1e-9)

  coll = report["collectives"]
  assert coll["all-gather"]["count"] >= cfg.num_layers  # fsdp gathers each layer's weights
  assert coll["all-reduce"]["bytes"] > 0
  assert all(row["dcn_bytes"] == 0 for row in coll.values())  # one slice: all on ICI
  roof = report["roofline"]
  assert roof["step_s_lower_bound"] >= roof["compute_s"] > 0
  assert 0 < roof["mfu_bound"] <= 1
  # The HBM term is the analytic traffic (aot.hbm_traffic) at v5e's 819 GB/s; the demo keeps every
  # projection (dots_with_no_batch_dims_saveable): weights read twice, float32, split by tensor 2.
  traffic = report["hbm_traffic"]
  assert math.isclose(roof["hbm_s"], traffic["total"] / 819e9, rel_tol=1e-12)
  assert cfg.remat_policy == "dots_with_no_batch_dims_saveable" and cfg.dtype == "float32"
  assert math.isclose(traffic["weights"], 2 * n * 4 / 2, rel_tol=1e-12)
  assert math.isclose(traffic["logits"], 4 * (tokens / 2) * cfg.vocab_size / 2 * 4, rel_tol=1e-12)


def test_too_large_for_the_slice_reports_fits_false_and_exits_3(tmp_path, capfd):
  big = ["MeshConfig.data = 1", "MeshConfig.fsdp = 4", "ModelConfig.num_layers = 8",
         "ModelConfig.d_model = 8192", "ModelConfig.num_heads = 64", "ModelConfig.num_kv_heads = 64",
         "ModelConfig.head_dim = 128", "ModelConfig.ffn_dim = 32768"]
  out = tmp_path / "big.json"
  assert run_cli(compile_args(big, "--topology", "v5e:2x2", "--json", str(out))) == 3
  assert "does NOT fit" in capfd.readouterr().out
  report = json.loads(out.read_text())
  assert report["fits"] is False
  # ~6.4e9 params x (4 + 4 + 4) bytes over 4 chips alone exceed a v5e's 15.75 GiB
  assert report["per_device_bytes"]["arguments"] > report["hbm_bytes_per_device"]
  assert report["per_device_bytes"]["peak"] > report["hbm_bytes_per_device"]


def _one_line_exit_2(argv, capfd, needle):
  assert run_cli(argv) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("glmjax compile: ") and needle in err[0], err


def test_bad_topology_exits_2_with_one_line(capfd):
  _one_line_exit_2(compile_args(SMALL_GLM, "--topology", "v5e-4"), capfd, "v5e:2x2")
  _one_line_exit_2(compile_args(SMALL_GLM, "--topology", "v5e:3x3"), capfd, "not divisible")


def test_mesh_that_does_not_divide_the_slice_exits_2_with_one_line(capfd):
  _one_line_exit_2(compile_args(SMALL_GLM + ["MeshConfig.fsdp = 8"], "--topology", "v5e:2x2"),
                   capfd, "MeshConfig")


def test_decode_step_arguments_are_params_plus_kv_cache(tmp_path):
  out = tmp_path / "decode.json"
  CONTEXT = 128  # a whole 128-lane tile, within max_length = 255
  assert run_cli(compile_args(SMALL_GLM, "--topology", "v5e:2x2", "--step", "decode",
                              "--context", str(CONTEXT), "--json", str(out))) == 0
  report = json.loads(out.read_text())
  cfg = small_model_config()
  rows = 16 // 2  # the batch over fsdp; kv heads over tensor
  kv = cfg.num_layers * rows * CONTEXT * (cfg.num_kv_heads // 2) * cfg.head_dim * np.dtype(cfg.dtype).itemsize
  slots = 3 * rows * CONTEXT * 4  # tokens, segment_ids, bidirectional
  cache = 2 * kv + slots + 512  # + the write index (one 512-byte buffer)
  new_token = 4 * 512  # tokens, positions, block_positions, segment_ids: [8, 1] int32 each
  mem = report["per_device_bytes"]
  assert mem["arguments"] == hand_param_bytes_per_device(cfg) + cache + new_token
  assert mem["aliased"] == cache  # the donated cache is written in place
  assert report["step"] == "decode" and report["fits"]
  n = matmul_params(cfg)
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * CONTEXT
  assert math.isclose(report["flops_per_step"], (2 * n + attention) * 16, rel_tol=1e-9)


def test_eval_step_arguments_are_params_and_batch_only(tmp_path):
  out = tmp_path / "eval.json"
  assert run_cli(compile_args(SMALL_GLM, "--topology", "v5e:2x2", "--step", "eval",
                              "--json", str(out))) == 0
  report = json.loads(out.read_text())
  mem = report["per_device_bytes"]
  assert mem["arguments"] == hand_param_bytes_per_device(small_model_config()) + 7 * 8 * 128 * 4
  assert mem["aliased"] == 0  # nothing donated
  assert math.isclose(report["flops_per_step"] * 3, _train_flops(), rel_tol=1e-9)


def _train_flops() -> float:
  cfg = small_model_config()
  n = matmul_params(cfg)
  return (6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128) * 16 * 128
