"""The Mosaic flash-attention kernels compile (not only lower) for v5e and v5p, forward and backward.

`lower()` only serialises the kernel; `compile()` runs libtpu's Mosaic compiler, which checks
VMEM use (e.g. block 2048 at head_dim 128 fails there with CompileTimeScopedVmemOom). The kernels
are reached through `backend="auto"`, as the model reaches them: picked per lowering platform,
so a CPU host targeting TPU devices gets Mosaic. Shapes cover head_dim 64 / 96 / 128, lengths
that are not a multiple of the 512 block, GQA groups 1 and 4, ALiBi, and 32K tokens.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from glmjax import aot
from glmjax.pallas.flash import flash_attention

MOSAIC = 'custom_call_target="tpu_custom_call"'


def compile_flash(topology, *, length, heads, kv_heads, head_dim, backward, alibi=False):
  """The compiled HLO text of flash attention (or its q/k/v gradient) on one chip of `topology`."""
  device = aot.topology_devices(topology)[0]
  on_chip = SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16, sharding=on_chip)
  kv = jax.ShapeDtypeStruct((1, length, kv_heads, head_dim), jnp.bfloat16, sharding=on_chip)
  rows = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=on_chip)
  slopes = jax.ShapeDtypeStruct((heads,), jnp.float32, sharding=on_chip)

  def forward(q, k, v, segment_ids, bidirectional, slopes):
    return flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                           alibi_slopes=slopes if alibi else None)

  def loss(q, k, v, segment_ids, bidirectional, slopes):
    return forward(q, k, v, segment_ids, bidirectional, slopes).astype(jnp.float32).sum()

  fn = jax.grad(loss, argnums=(0, 1, 2)) if backward else forward
  with aot.no_persistent_cache():
    return jax.jit(fn).lower(q, kv, kv, rows, rows, slopes).compile().as_text()


# (length, heads, kv_heads, head_dim[, alibi]) per test: few shapes, each compile ~1 s here
CASES = {
    ("v5e:2x2", False): [(1000, 8, 2, 64), (32768, 2, 2, 128)],
    ("v5e:2x2", True): [(700, 4, 4, 96, True), (32768, 4, 1, 128)],
    ("v5p:2x2x1", False): [(384, 4, 4, 96), (1000, 8, 2, 128, True)],
    ("v5p:2x2x1", True): [(1000, 8, 2, 64), (32768, 2, 2, 128)],
}


@pytest.mark.parametrize("topology,backward", list(CASES), ids=lambda v: str(v))
def test_flash_kernels_compile(topology, backward):
  for case in CASES[(topology, backward)]:
    length, heads, kv_heads, head_dim = case[:4]
    hlo = compile_flash(topology, length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        backward=backward, alibi=len(case) > 4)
    # forward: one kernel; backward: the forward (for lse) + the dq and dk/dv kernels
    assert hlo.count(MOSAIC) == (3 if backward else 1), (topology, case)
