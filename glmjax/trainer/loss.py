"""Token cross-entropy weighted by `loss_mask`, with optional z-loss.

Everything is returned as sums over tokens so that microbatches (and hosts)
add up exactly; the trainer divides by the total number of counted tokens
once, which makes gradient accumulation equal to the big batch.

The per-token terms come from one custom-VJP function: its backward is the
closed form softmax(logits) * (g_nll + g_lse) - onehot(target) * g_nll, one
fused pass over the [tokens, vocab] logits instead of autodiff's gather ->
scatter-add (slow on CPU) and several saved intermediates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glmjax.model.batch import target_is_argmax


@jax.custom_vjp
def token_terms(logits, targets):
  """Per token: (nll, log Z, correct) with log Z = logsumexp(logits), nll = log Z - logits[target],
  correct = 1.0 when the target is the argmax (`glmjax.model.batch.target_is_argmax`: ties go to
  the lowest id, as evaluation's accuracy)."""
  return _token_terms(logits, targets)[0]


def _token_terms(logits, targets):
  logits = logits.astype(jnp.float32)
  row_max = jnp.max(logits, axis=-1)
  log_z = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = target_is_argmax(logits, targets).astype(jnp.float32)
  return (log_z - target_logit, log_z, correct), (logits, targets, log_z)


def _token_terms_bwd(residuals, cotangents):
  logits, targets, log_z = residuals
  g_nll, g_lse, _ = cotangents
  probs = jnp.exp(logits - log_z[..., None])
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  onehot = (vocab == targets[..., None].astype(jnp.int32)).astype(jnp.float32)
  d_logits = probs * (g_nll + g_lse)[..., None] - onehot * g_nll[..., None]
  return d_logits, None


token_terms.defvjp(_token_terms, _token_terms_bwd)


def token_loss_sums(logits_BLV, targets_BL, loss_mask_BL) -> dict:
  """Sums of per-token terms over the counted tokens (float32).

  nll   = logsumexp(logits) - logits[target]
  z     = logsumexp(logits)^2   (PaLM's z-loss, keeps the softmax normaliser near 1)
  correct = the target is the argmax (first maximum on ties)
  """
  weights = loss_mask_BL.astype(jnp.float32)
  nll, log_z, correct = token_terms(logits_BLV, targets_BL)
  return {
      "nll_sum": jnp.sum(nll * weights),
      "z_sum": jnp.sum(jnp.square(log_z) * weights),
      "correct_sum": jnp.sum(jax.lax.stop_gradient(correct) * weights),
      "weight_sum": jnp.sum(weights),
  }
