"""Attention entry point (DESIGN.md section 3, contract).

`attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, impl="auto")`
with q [b, l, heads, d] and k/v [b, l, kv_heads, d].
"""

from __future__ import annotations

import jax

from glmjax.pallas.reference import alibi_bias, attention_mask, attention_reference

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  return impl


def attention(q, k, v, *, segment_ids, bidirectional, alibi_slopes=None, impl="auto", **kernel_options):
  """Masked attention under the packing + GLM rule; see glmjax.pallas.reference."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return attention_reference(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                               alibi_slopes=alibi_slopes)
  from glmjax.pallas import flash  # pylint: disable=import-outside-toplevel
  return flash.flash_attention(q, k, v, segment_ids=segment_ids, bidirectional=bidirectional,
                               alibi_slopes=alibi_slopes, **kernel_options)


__all__ = ["attention", "attention_reference", "attention_mask", "alibi_bias", "resolve_impl", "IMPLS"]
