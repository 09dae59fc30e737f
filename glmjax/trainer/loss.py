"""Token cross-entropy weighted by `loss_mask`, with optional z-loss.

Everything is returned as sums over tokens so that microbatches (and hosts)
add up exactly; the trainer divides by the total number of counted tokens
once, which makes gradient accumulation equal to the big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_loss_sums(logits_BLV, targets_BL, loss_mask_BL) -> dict:
  """Sums of per-token terms over the counted tokens (float32).

  nll   = logsumexp(logits) - logits[target]
  z     = logsumexp(logits)^2   (PaLM's z-loss, keeps the softmax normaliser near 1)
  correct = argmax(logits) == target
  """
  logits = logits_BLV.astype(jnp.float32)
  weights = loss_mask_BL.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = log_z - target_logit
  correct = (jnp.argmax(logits, axis=-1) == targets_BL).astype(jnp.float32)
  return {
      "nll_sum": jnp.sum(nll * weights),
      "z_sum": jnp.sum(jnp.square(log_z) * weights),
      "correct_sum": jnp.sum(correct * weights),
      "weight_sum": jnp.sum(weights),
  }
