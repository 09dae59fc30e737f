"""Parsing collectives out of optimized HLO text: replica-group formats, loop trip counts, DCN."""

import numpy as np

from glmjax import aot


def test_replica_group_formats_expand_to_the_same_groups():
  iota = 'x = f32[8] all-reduce(y), replica_groups=[2,4]<=[8], to_apply=%add'
  np.testing.assert_array_equal(aot.replica_groups(iota, 8), [[0, 1, 2, 3], [4, 5, 6, 7]])
  transposed = 'x = f32[8] all-reduce(y), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add'
  np.testing.assert_array_equal(aot.replica_groups(transposed, 8), [[0, 4], [1, 5], [2, 6], [3, 7]])
  explicit = 'x = f32[8] all-gather(y), replica_groups={{0,2},{1,3}}, dimensions={0}'
  np.testing.assert_array_equal(aot.replica_groups(explicit, 4), [[0, 2], [1, 3]])
  mesh = "x = f32[8] all-reduce(y), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%a"
  np.testing.assert_array_equal(aot.replica_groups(mesh, 4), [[0, 2], [1, 3]])
  both = "x = f32[8] all-reduce(y), replica_groups=mesh['axis_0'=2,'axis_1'=2], to_apply=%a"
  np.testing.assert_array_equal(aot.replica_groups(both, 4), [[0, 1, 2, 3]])


HLO = """\
HloModule m

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]) parameter(0)
  %g = f32[1024]{0} get-tuple-element(%p), index=1
  %ag = bf16[4,256]{1,0} all-gather(%g), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[1024]) tuple(%i, %g)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]) parameter(0)
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %w = (s32[], f32[1024]) while(%init), condition=%cond, body=%body
  %ar = f32[1024]{0} all-reduce(%a), channel_id=2, replica_groups={{0,2},{1,3}}, to_apply=%add
  %s = (f32[1024]{0}, u32[], token[]) send(%ar, %tok), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[1024]{0} copy(%ar)
}
"""


def test_loop_bodies_count_per_iteration_and_groups_across_slices_are_dcn():
  # devices 0, 1 in slice 0 and 2, 3 in slice 1: {0,2},{1,3} crosses slices; [2,2]<=[4] does not
  out = aot.parse_collectives(HLO, [0, 0, 1, 1], 4)
  assert out["all-gather"]["count"] == 6  # the while body runs 6 times
  assert out["all-gather"]["bytes"] == 6 * 4 * 256 * 2 and out["all-gather"]["dcn_bytes"] == 0
  ar = out["all-reduce"]
  assert ar["count"] == 2  # the ICI-described one and the megascale send
  assert ar["dcn_bytes"] == 2 * 1024 * 4 and ar["ici_bytes"] == 0
  # ring all-reduce over 2 members moves 2 (n - 1) / n = 1x the buffer per device
  assert ar["wire_bytes_dcn"] == 2 * 1024 * 4
