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

import functools

import jax
import jax.numpy as jnp


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
  correct = _target_is_first_max(logits, targets, row_max, target_logit).astype(jnp.float32)
  return (log_z - target_logit, log_z, correct), (logits, targets, log_z)


def _target_is_first_max(logits, targets, row_max, target_logit):
  """`glmjax.model.batch.target_is_argmax(logits, targets)` from the row max already computed: the
  target holds the maximum and no lower id does (max over the ids below the target < the row max). One masked
  max-reduction instead of XLA:CPU's (value, index) argmax reduction, which took 70 ms of the
  llama-small step ([4096, 8192] logits) against ~45 ms for this (BENCHMARKS.md, issue #13)."""
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  below = jnp.max(jnp.where(vocab < targets[..., None].astype(jnp.int32), logits, -jnp.inf), axis=-1)
  return (target_logit == row_max) & ((targets == 0) | (below < row_max))


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



def chunked_token_loss_sums(head_fn, head_params, hidden_BLD, targets_BL, loss_mask_BL,
                            chunk: int) -> dict:
  """`token_loss_sums(head_fn(head_params, hidden), ...)` without [B, L, V] logits, forward or
  backward.

  The positions are cut into ceil(L / chunk) chunks of `chunk` (the last one padded with
  weight-0 positions); a `lax.scan` over the chunks computes each chunk's [B, chunk, V] logits,
  their per-token terms and the sums, and adds them up. Each chunk is a `jax.checkpoint` with
  nothing saved, so the backward recomputes one chunk's logits at a time (the price: the head's
  forward matmul once more) and the gradients of `head_params` accumulate over the chunks. Peak
  temporaries: one chunk's float32 logits and their gradient instead of the whole sequence's.
  Same sums as the dense path up to float summation order.
  """
  B, L, D = hidden_BLD.shape
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"ModelConfig.loss_chunk_size={chunk!r} must be a positive int")
  chunk = min(chunk, L)
  n = -(-L // chunk)
  pad = n * chunk - L
  weights = loss_mask_BL.astype(jnp.float32)
  targets = targets_BL.astype(jnp.int32)
  if pad:
    hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))

  def chunks(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
    return jnp.swapaxes(x.reshape((B, n, chunk) + x.shape[2:]), 0, 1)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                     prevent_cse=False)
  def chunk_sums(hp, h, t, w):
    nll, log_z, correct = token_terms(head_fn(hp, h), t)
    return (jnp.sum(nll * w), jnp.sum(jnp.square(log_z) * w),
            jnp.sum(jax.lax.stop_gradient(correct) * w), jnp.sum(w))

  def body(acc, xs):
    return tuple(a + s for a, s in zip(acc, chunk_sums(head_params, *xs))), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, z_sum, correct_sum, weight_sum), _ = jax.lax.scan(
      body, (zero, zero, zero, zero), (chunks(hidden_BLD), chunks(targets), chunks(weights)))
  return {"nll_sum": nll_sum, "z_sum": z_sum, "correct_sum": correct_sum, "weight_sum": weight_sum}
