"""Tiled flash attention under the packing + GLM mask, forward and backward (custom_vjp).

`flash_attention` computes exactly `attention_reference` (same mask rule, ALiBi
bias slope * (j - i), grouped query heads, zero rows for padding) in O(L)
memory: the forward saves only the output and the per-row log-sum-exp, the
backward recomputes probabilities tile by tile (FlashAttention-2, Dao 2023).

Two kernel variants share glmjax.pallas.tile_math and glmjax.pallas.blocks:
`mosaic_tpu` (key loop as a grid axis, scalar-prefetched block-skip tables)
and `triton` (key loop inside the kernel). With backend="auto" the choice is
made per lowering platform by `lax.platform_dependent`: Mosaic on TPU, Triton
on CUDA / ROCm, and on CPU the Triton variant in interpret mode (the faster
of the two under the interpreter). So a function using it can be exported
for TPU or GPU from a CPU host.

Exporting for "cuda" needs `disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
"__gpu$xla.gpu.triton")]`: Triton custom calls carry no serialization
compatibility guarantee (the lowering itself is complete).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from glmjax.pallas import blocks, flash_tpu, flash_triton

VARIANTS = {"mosaic_tpu": flash_tpu, "triton": flash_triton}
BACKENDS = ("auto", *VARIANTS)
CPU_VARIANT = "triton"
INTERPRET_MIN_BLOCK = 8
MIN_HEAD_DIM = 16


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Static kernel settings; None block sizes mean the variant's default."""
  scale: float
  block_q: int | None = None
  block_k: int | None = None
  backend: str = "auto"
  interpret: bool = False


@dataclasses.dataclass(frozen=True)
class _Layout:
  block_q: int
  block_k: int
  length: int
  head_dim: int


def _layout(variant: str, options: KernelOptions, interpret: bool, length: int, head_dim: int):
  """Block sizes and padded sizes for one variant.

  Blocks are raised to the variant's minimum tile (128 on TPU, 16 on GPU) and
  lowered to the padded sequence length, so short sequences are not padded to
  a long default block. head_dim is padded to a power of two (96 -> 128).
  """
  module = VARIANTS[variant]
  floor = INTERPRET_MIN_BLOCK if interpret else module.MIN_BLOCK
  ceiling = max(floor, blocks.next_power_of_2(length))

  def fit(requested, default):
    return min(max(requested or default, floor), ceiling)

  block_q = fit(options.block_q, module.DEFAULT_BLOCK_Q)
  block_k = fit(options.block_k, module.DEFAULT_BLOCK_K)
  padded_length = blocks.round_up(length, max(block_q, block_k))
  padded_dim = max(blocks.next_power_of_2(head_dim), MIN_HEAD_DIM)
  return _Layout(block_q, block_k, padded_length, padded_dim)


def _to_heads_major(x, layout: _Layout):
  """[b, l, heads, d] -> padded [b, heads, L, D]."""
  x = jnp.swapaxes(x, 1, 2)
  return blocks.pad_axis(blocks.pad_axis(x, 2, layout.length), 3, layout.head_dim)


def _from_heads_major(x, length: int, head_dim: int):
  return jnp.swapaxes(x[:, :, :length, :head_dim], 1, 2)


def _pad_tokens(segment_ids, bidirectional, layout: _Layout):
  return (blocks.pad_axis(segment_ids, 1, layout.length),
          blocks.pad_axis(bidirectional, 1, layout.length))


def _forward_branch(variant, interpret, options, q, k, v, segment_ids, bidirectional, slopes):
  length, head_dim = q.shape[1], q.shape[3]
  layout = _layout(variant, options, interpret, length, head_dim)
  seg, bidi = _pad_tokens(segment_ids, bidirectional, layout)
  o, lse = VARIANTS[variant].forward(
      _to_heads_major(q, layout), _to_heads_major(k, layout), _to_heads_major(v, layout), seg, bidi,
      slopes, scale=options.scale, block_q=layout.block_q, block_k=layout.block_k,
      interpret=interpret)
  return _from_heads_major(o, length, head_dim), lse[:, :, :length]


def _backward_branch(variant, interpret, options, q, k, v, segment_ids, bidirectional, slopes, d_out,
                     lse, delta):
  length, head_dim = q.shape[1], q.shape[3]
  layout = _layout(variant, options, interpret, length, head_dim)
  seg, bidi = _pad_tokens(segment_ids, bidirectional, layout)
  dq, dk, dv, dslopes = VARIANTS[variant].backward(
      _to_heads_major(q, layout), _to_heads_major(k, layout), _to_heads_major(v, layout),
      _to_heads_major(d_out, layout), blocks.pad_axis(lse, 2, layout.length),
      blocks.pad_axis(delta, 2, layout.length), seg, bidi, slopes, scale=options.scale,
      block_q=layout.block_q, block_k=layout.block_k, interpret=interpret)
  return (_from_heads_major(dq, length, head_dim), _from_heads_major(dk, length, head_dim),
          _from_heads_major(dv, length, head_dim), dslopes)


def _on_platform(branch, options: KernelOptions, *args):
  """Runs `branch(variant, interpret, options, *args)` for the platform being lowered for."""
  if options.backend != "auto":
    return branch(options.backend, options.interpret, options, *args)
  if options.interpret:
    return branch(CPU_VARIANT, True, options, *args)
  compiled = {"tpu": ("mosaic_tpu", False), "cuda": ("triton", False), "rocm": ("triton", False)}
  per_platform = {platform: functools.partial(branch, variant, interpret, options)
                  for platform, (variant, interpret) in compiled.items()}
  return lax.platform_dependent(*args, default=functools.partial(branch, CPU_VARIANT, True, options),
                                **per_platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, segment_ids, bidirectional, slopes, options):
  out, _ = _on_platform(_forward_branch, options, q, k, v, segment_ids, bidirectional, slopes)
  return out


def _flash_fwd(q, k, v, segment_ids, bidirectional, slopes, options):
  out, lse = _on_platform(_forward_branch, options, q, k, v, segment_ids, bidirectional, slopes)
  return out, (q, k, v, segment_ids, bidirectional, slopes, out, lse)


def _flash_bwd(options, residuals, d_out):
  q, k, v, segment_ids, bidirectional, slopes, out, lse = residuals
  delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(out.dtype), out,
                     preferred_element_type=jnp.float32)
  dq, dk, dv, dslopes = _on_platform(_backward_branch, options, q, k, v, segment_ids, bidirectional,
                                     slopes, d_out.astype(q.dtype), lse, delta)
  return dq, dk, dv, None, None, dslopes


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_block(name, value):
  if value is not None and (value < 1 or value & (value - 1)):
    raise ValueError(f"{name}={value} must be a power of two (e.g. 128 or 512)")


def validate_inputs(q, k, v, segment_ids, bidirectional, alibi_slopes):
  """Raises ValueError naming the argument when shapes do not fit the attention contract."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q and k must be [batch, length, heads, head_dim], got {q.shape=} {k.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape=} {v.shape=}")
  batch, length, num_heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[1] != length or k.shape[3] != head_dim:
    raise ValueError(f"k must be [batch, length, kv_heads, head_dim] matching q, got {q.shape=} "
                     f"{k.shape=} (use decode_attention for queries against a longer KV cache)")
  if num_heads % k.shape[2]:
    raise ValueError(f"{num_heads=} must be a multiple of num_kv_heads={k.shape[2]}")
  for name, x in (("segment_ids", segment_ids), ("bidirectional", bidirectional)):
    if tuple(x.shape) != (batch, length):
      raise ValueError(f"{name} must be [batch, length] = {(batch, length)}, got {tuple(x.shape)}")
  if alibi_slopes is not None and tuple(jnp.shape(alibi_slopes)) != (num_heads,):
    raise ValueError(f"alibi_slopes must be [heads] = ({num_heads},), got {jnp.shape(alibi_slopes)}")


def flash_attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, scale=None,
                    block_q=None, block_k=None, backend="auto", interpret=False):
  """Flash attention with the same meaning as glmjax.pallas.reference.attention_reference.

  Args:
    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim].
    segment_ids: int [batch, length], packed example ids, 0 = padding.
    bidirectional: [batch, length], 1 where a token is visible to its whole segment.
    alibi_slopes: optional float [heads]; bias slope * (j - i) is added in-kernel
      and the slopes get a gradient.
    scale: score scale, default 1 / sqrt(head_dim).
    block_q, block_k: tile sizes (powers of two); default per variant
      (512 on TPU, 64 on GPU), raised to the variant's minimum tile and capped
      at the padded sequence length.
    backend: "auto" (per lowering platform), "mosaic_tpu" or "triton".
    interpret: run the kernels with the Pallas interpreter (CPU testing).
  Returns:
    [batch, length, heads, head_dim] in q.dtype.
  """
  validate_inputs(q, k, v, segment_ids, bidirectional, alibi_slopes)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  options = KernelOptions(scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                          block_q=block_q, block_k=block_k, backend=backend,
                          interpret=bool(interpret))
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
  return _flash(q, k, v, jnp.asarray(segment_ids, jnp.int32), jnp.asarray(bidirectional, jnp.int32),
                slopes, options)
