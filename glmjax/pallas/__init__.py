"""Attention entry point (DESIGN.md section 3, contract).

`attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, impl="auto")`
with q [b, l, heads, d] and k/v [b, l, kv_heads, d].

impl: "xla" the plain reference (materialises scores, O(L^2) memory, autodiff);
"dense" the same math with a recomputing custom VJP (glmjax.pallas.dense,
fastest on CPU); "pallas" the tiled flash kernels of glmjax.pallas.flash
(O(L) memory; Mosaic on TPU, Triton on GPU, interpret mode on CPU);
"auto" pallas on TPU and GPU, dense on CPU.
`decode_attention` serves a few new queries against a KV cache.
"""

from __future__ import annotations

import functools

import jax

from glmjax.pallas.decode import decode_attention, segment_ids_from_lengths
from glmjax.pallas.dense import dense_attention
from glmjax.pallas.reference import alibi_bias, attention_mask, attention_reference, masked_attention

IMPLS = ("auto", "xla", "dense", "pallas")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The implementation `impl` means on `platform` (default: jax's default backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    return "dense" if (platform or jax.default_backend()) == "cpu" else "pallas"
  return impl


def attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, impl="auto", reaches_later_block=None,
              **kernel_options):
  """Masked attention under the packing + GLM rule; see glmjax.pallas.reference.

  `kernel_options` go to glmjax.pallas.flash.flash_attention for impl="pallas"
  (block_q, block_k, backend, interpret, scale); only `scale` changes the result.
  impl="auto" is decided per lowering platform, so exporting for TPU or GPU
  from a CPU host gets the kernel. `reaches_later_block` goes to the dense implementation
  (glmjax.pallas.dense.dense_attention: its block-skipping test, precomputed).
  """
  def run(impl, q, k, v, segment_ids, bidirectional, alibi_slopes):
    if impl == "xla":
      return attention_reference(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                 alibi_slopes=alibi_slopes, scale=kernel_options.get("scale"))
    if impl == "dense":
      return dense_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                             alibi_slopes=alibi_slopes, scale=kernel_options.get("scale"),
                             reaches_later_block=reaches_later_block)
    from glmjax.pallas import flash  # pylint: disable=import-outside-toplevel
    from glmjax.pallas.partitioning import shard_kernel  # pylint: disable=import-outside-toplevel

    def kernel(q, k, v, segment_ids, bidirectional, alibi_slopes):
      return flash.flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                                   alibi_slopes=alibi_slopes, **kernel_options)

    return shard_kernel(kernel, q, k, v, segment_ids, bidirectional, alibi_slopes)

  from glmjax.pallas import ring  # pylint: disable=import-outside-toplevel
  if ring.context_size() > 1:  # the sequence is split over the `context` mesh axis
    kernel = None  # "xla", "dense", "auto": blocks in XLA; "pallas": the ring's Pallas block kernel
    if impl == "pallas":
      cpu = kernel_options.get("interpret") or jax.default_backend() == "cpu"
      kernel = "interpret" if cpu else "compiled"
    return ring.ring_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                               alibi_slopes=alibi_slopes, scale=kernel_options.get("scale"),
                               kernel=kernel, block_k=kernel_options.get("block_k"))
  args = (q, k, v, segment_ids, bidirectional, alibi_slopes)
  if resolve_impl(impl) == impl:
    return run(impl, *args)
  return jax.lax.platform_dependent(*args, cpu=functools.partial(run, "dense"),
                                    default=functools.partial(run, "pallas"))


__all__ = ["attention", "attention_reference", "attention_mask", "alibi_bias", "decode_attention",
           "dense_attention",
           "masked_attention", "resolve_impl", "segment_ids_from_lengths", "IMPLS"]
