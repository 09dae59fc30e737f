"""Multi-slice: the data axis over DCN (hybrid mesh), compiled for 2 x v5e:2x2 with libtpu."""

import json

import pytest

from glmjax import aot
from glmjax.sharding import MeshConfig, make_mesh
from tests.tpu.test_compile_cli import (SMALL_GLM, compile_args, hand_param_bytes_per_device,
                                        run_cli, small_model_config)

# SMALL_GLM's fsdp=2 x tensor=2 inside each slice, data=2 across the two slices
TWO_SLICES = [b for b in SMALL_GLM if not b.startswith("MeshConfig.data")] + ["MeshConfig.data = 2"]


def test_hybrid_mesh_puts_the_data_axis_across_slices():
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  assert sorted({aot.slice_index(d) for d in devices}) == [0, 1]
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "stage": 1, "context": 1, "tensor": 2,
                              "expert": 1}
  for d in range(2):  # each data index is one whole slice: fsdp / tensor stay on ICI
    assert {aot.slice_index(x) for x in mesh.devices[d].flat} == {mesh.devices[d].flat[0].slice_index}
  assert mesh.devices[0].flat[0].slice_index != mesh.devices[1].flat[0].slice_index

  fsdp_over_dcn = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, dcn_data=1, dcn_fsdp=2), devices)
  first_half = {aot.slice_index(x) for x in fsdp_over_dcn.devices[0, :2].flat}
  assert len(first_half) == 1 and fsdp_over_dcn.devices[0, 2].flat[0].slice_index not in first_half


@pytest.mark.parametrize("config,needle", [
    (MeshConfig(data=1, fsdp=4, tensor=2), "MeshConfig.data=1 cannot span 2 slices"),
    (MeshConfig(data=2, fsdp=4, tensor=1, dcn_data=2, dcn_fsdp=2), "must equal the 2 slices"),
])
def test_meshes_that_do_not_split_over_the_slices_name_the_field(config, needle):
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  with pytest.raises(ValueError, match=needle):
    make_mesh(config, devices)


def test_two_slices_compile_with_the_gradient_all_reduce_over_dcn(tmp_path, capfd):
  out = tmp_path / "two.json"
  assert run_cli(compile_args(TWO_SLICES, "--topology", "v5e:2x2", "--num_slices", "2",
                              "--json", str(out))) == 0
  assert "2 slices" in capfd.readouterr().out
  report = json.loads(out.read_text())
  assert report["num_devices"] == 8 and report["num_slices"] == 2 and report["fits"]
  all_reduce = report["collectives"]["all-reduce"]
  # every gradient shard (fsdp x tensor within a slice) is summed across the 2 slices at least once
  assert all_reduce["dcn_bytes"] >= hand_param_bytes_per_device(small_model_config())
  assert all_reduce["ici_bytes"] > 0  # and fsdp / tensor reductions stay inside the slice
  assert report["roofline"]["dcn_s"] > 0


def test_bad_num_slices_and_meshes_that_cannot_span_the_slices_exit_2(capfd):
  assert run_cli(compile_args(TWO_SLICES, "--topology", "v5e:2x2", "--num_slices", "0")) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--num_slices" in err[0], err
  assert run_cli(compile_args(TWO_SLICES, "--topology", "v5e:2x2", "--num_slices", "2",
                              "--gin", "MeshConfig.data = 1", "--gin", "MeshConfig.fsdp = 4")) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot span 2 slices" in err[0], err

