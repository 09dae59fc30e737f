"""Per-tile math shared by every flash-attention kernel variant (Mosaic TPU, Triton).

Functions take array values already loaded from refs, so they are backend
neutral; each kernel builds its index / segment arrays in its native layout
(row vectors [1, bk] and column vectors [bq, 1], or full tiles) and calls these.
The in-tile mask is the batch contract's rule itself,
`glmjax.model.batch.may_attend(q_seg, k_seg, k_bidi, q_pos, k_pos)` on the
tile's segment ids and global row indices (its operators lower on Mosaic and
Triton alike).
Names follow FlashAttention-2 (Dao, 2023), Algorithms 1 and 2: `m_i` running
row max, `l_i` running row sum, `acc` un-normalised output, `lse` log-sum-exp,
`delta` = rowsum(dO * O).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf: exp(MASK_VALUE - m) is 0 for any real row max m,
# and MASK_VALUE - MASK_VALUE stays finite, so fully masked rows never make NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_nn(a, b):
  return lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)


def masked_scores(q, k, *, scale, visible, q_pos, k_pos, alibi_slope=None):
  """Scores s = scale * q k^T + slope * (j - i), MASK_VALUE where not visible. float32 [bq, bk]."""
  s = dot_nt(q, k) * scale
  if alibi_slope is not None:
    s = s + alibi_slope * (k_pos - q_pos).astype(jnp.float32)
  return jnp.where(visible, s, MASK_VALUE)


def initial_state(block_q: int, head_dim: int):
  """Starting (m_i, l_i, acc) of the online softmax."""
  m_i = jnp.full((block_q, 1), MASK_VALUE, jnp.float32)
  l_i = jnp.zeros((block_q, 1), jnp.float32)
  acc = jnp.zeros((block_q, head_dim), jnp.float32)
  return m_i, l_i, acc


def online_softmax_step(m_i, l_i, acc, s, visible, v):
  """Folds one key tile into the running row max, row sum and output (FA-2 Alg. 1, lines 8-10).

  Probabilities are zeroed outside the mask explicitly: while a row has seen
  only masked keys its max is MASK_VALUE and exp(s - m) would be 1.
  """
  m_next = jnp.maximum(m_i, jnp.max(s, axis=1, keepdims=True))
  correction = jnp.exp(m_i - m_next)
  p = jnp.where(visible, jnp.exp(s - m_next), 0.0)
  l_next = correction * l_i + jnp.sum(p, axis=1, keepdims=True)
  acc_next = correction * acc + dot_nn(p.astype(v.dtype), v)
  return m_next, l_next, acc_next


def finalize(m_i, l_i, acc):
  """Normalised output [bq, d] float32 and lse [bq, 1].

  Rows that saw no key give output 0 and lse MASK_VALUE (their probabilities
  are masked to 0 in the backward pass).
  """
  empty = l_i == 0.0
  safe_l = jnp.where(empty, 1.0, l_i)
  return acc / safe_l, m_i + jnp.log(safe_l)


def probabilities(s, visible, lse):
  """Softmax probabilities recomputed from the saved log-sum-exp (FA-2 Alg. 2, line 11)."""
  return jnp.where(visible, jnp.exp(s - lse), 0.0)


def score_gradient(p, dp, delta):
  """dS = P * (dP - delta), the softmax backward (FA-2 Alg. 2, line 14)."""
  return p * (dp - delta)


def alibi_slope_gradient_terms(ds, q_pos, k_pos):
  """dS * (j - i): summed over every tile of a head this is dL/d slope (bias = slope * (j - i))."""
  return ds * (k_pos - q_pos).astype(jnp.float32)
