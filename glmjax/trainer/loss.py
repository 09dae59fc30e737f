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



# Logical axes of the head params (glmjax.model.params: the embedding [vocab, embed], the untied
# lm_head kernel [embed, vocab] and its bias [vocab]). The chunked loss keeps its head-gradient
# accumulator sharded by them, like the params it is the gradient of.
HEAD_PARAM_AXES = {"embed": {"embedding": ("vocab", "embed")},
                   "lm_head": {"kernel": ("embed", "vocab"), "bias": ("vocab",)}}


def constrain_like_params(tree, param_axes=None):
  """Each leaf of `tree` (head params or their gradients) under the logical sharding constraint of
  its param (`param_axes`, default HEAD_PARAM_AXES; leaves without axes are left alone). The
  identity outside a mesh with logical rules (glmjax.model.constraints)."""
  from glmjax.model.constraints import constrain  # pylint: disable=import-outside-toplevel
  axes_tree = HEAD_PARAM_AXES if param_axes is None else param_axes

  def one(path, leaf):
    axes = axes_tree
    for key in path:
      axes = axes.get(getattr(key, "key", None)) if isinstance(axes, dict) else None
    return constrain(leaf, axes) if isinstance(axes, tuple) and len(axes) == leaf.ndim else leaf

  return jax.tree_util.tree_map_with_path(one, tree)


def chunked_token_loss_sums(head_fn, head_params, hidden_BLD, targets_BL, loss_mask_BL,
                            chunk: int, param_axes=None) -> dict:
  """`token_loss_sums(head_fn(head_params, hidden), ...)` without [B, L, V] logits, forward or
  backward.

  The positions are cut into ceil(L / chunk) chunks of `chunk` (the last one padded with
  weight-0 positions); a `lax.scan` over the chunks computes each chunk's [B, chunk, V] logits,
  their per-token terms and the sums, and adds them up, keeping only each position's log Z. The
  backward (a custom VJP, `_chunked_sums`) is a second scan: it recomputes one chunk's logits
  (the price: the head's forward matmul once more), forms d logits in closed form
  (softmax * (g_nll + 2 g_z log Z) w - onehot * g_nll w), pulls them back through the head, and
  adds the chunk's head-param gradient into an accumulator in the params' dtype under the
  params' own sharding (`constrain_like_params`; autodiff's scan transpose would carry it
  unsharded: on a 4-chip v5p the [4096, 65024] float32 accumulator of ChatGLM2's head whole on
  every chip). Peak temporaries: one chunk's float32 logits and their gradient instead of the
  whole sequence's. Same sums and gradients as the dense path up to float summation order;
  `correct_sum` and `weight_sum` carry no gradient (as the dense path: stop_gradient, the mask).
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

  sums_fn = _chunked_sums(head_fn, param_axes)
  nll_sum, z_sum, correct_sum, weight_sum = sums_fn(
      head_params, chunks(hidden_BLD), chunks(targets), chunks(weights))
  return {"nll_sum": nll_sum, "z_sum": z_sum, "correct_sum": correct_sum, "weight_sum": weight_sum}


def _chunked_sums(head_fn, param_axes):
  """(nll, z, correct, weight) sums over chunks [n, B, chunk, ...] as a custom-VJP function of
  (head params, hidden chunks, target chunks, weight chunks)."""

  def forward(hp, hs, ts, ws):
    def body(acc, xs):
      h, t, w = xs
      nll, log_z, correct = token_terms(head_fn(hp, h), t)
      sums = (jnp.sum(nll * w), jnp.sum(jnp.square(log_z) * w), jnp.sum(correct * w), jnp.sum(w))
      return tuple(a + b for a, b in zip(acc, sums)), log_z

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero, zero, zero), (hs, ts, ws))

  @jax.custom_vjp
  def sums_fn(hp, hs, ts, ws):
    return forward(hp, hs, ts, ws)[0]

  def fwd(hp, hs, ts, ws):
    sums, log_z = forward(hp, hs, ts, ws)
    return sums, (hp, hs, ts, ws, log_z)

  def bwd(residuals, cotangents):
    hp, hs, ts, ws, log_z = residuals
    g_nll, g_z = cotangents[0], cotangents[1]

    def body(acc, xs):
      h, t, w, lz = xs
      logits, pull = jax.vjp(head_fn, hp, h)
      probs = jnp.exp(logits.astype(jnp.float32) - lz[..., None])
      vocab = jax.lax.broadcasted_iota(jnp.int32, probs.shape, probs.ndim - 1)
      onehot = (vocab == t[..., None]).astype(jnp.float32)
      d_logits = (probs * ((g_nll + 2.0 * g_z * lz) * w)[..., None]
                  - onehot * (g_nll * w)[..., None]).astype(logits.dtype)
      d_hp, d_h = pull(d_logits)
      d_hp = constrain_like_params(d_hp, param_axes)
      acc = jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc, d_hp)
      return constrain_like_params(acc, param_axes), d_h

    zeros = constrain_like_params(jax.tree.map(jnp.zeros_like, hp), param_axes)
    d_hp, d_hs = jax.lax.scan(body, zeros, (hs, ts, ws, log_z))
    return d_hp, d_hs, None, jnp.zeros_like(ws)

  sums_fn.defvjp(fwd, bwd)
  return sums_fn
