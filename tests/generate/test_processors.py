"""Logits processors against plain-Python definitions."""

import jax.numpy as jnp
import numpy as np

from glmjax.generate import processors as procs

V = 12


def _history(rows, width=10):
  tokens = np.zeros((len(rows), width), np.int32)
  valid = np.zeros((len(rows), width), bool)
  for b, row in enumerate(rows):
    tokens[b, width - len(row):] = row  # left-padded like the decoder's cache
    valid[b, width - len(row):] = True
  return procs.History(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(width, jnp.int32))


def _logits(seed=0, rows=2):
  return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32) * 3


def test_repetition_penalty_ctrl_rule():
  rows = [[1, 4, 4, 7], [2, 3]]
  logits = _logits()
  got = np.asarray(procs.repetition_penalty(1.3)(jnp.asarray(logits), _history(rows)))
  want = logits.copy()
  for b, row in enumerate(rows):
    for t in set(row):
      want[b, t] = logits[b, t] / 1.3 if logits[b, t] > 0 else logits[b, t] * 1.3
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
  rows = [[1, 2, 3, 1, 2, 5, 1, 2], [4, 4, 4, 9], [6]]
  logits = _logits(rows=3)
  for n in (1, 2, 3):
    got = np.asarray(procs.no_repeat_ngram(n)(jnp.asarray(logits), _history(rows)))
    for b, row in enumerate(rows):
      banned = set()
      prefix = tuple(row[len(row) - (n - 1):]) if n > 1 else ()
      if len(row) >= n - 1:
        for j in range(len(row) - n + 1):
          if tuple(row[j:j + n - 1]) == prefix:
            banned.add(row[j + n - 1])
      for t in range(V):
        assert (got[b, t] == -np.inf) == (t in banned), (n, b, t)


def test_top_k_and_top_p_keep_the_defined_sets():
  logits = _logits(3)
  got_k = np.asarray(procs.top_k(4)(jnp.asarray(logits), None))
  for b in range(2):
    assert set(np.flatnonzero(np.isfinite(got_k[b]))) == set(np.argsort(-logits[b])[:4])
  got_p = np.asarray(procs.top_p(0.7)(jnp.asarray(logits), None))
  for b in range(2):
    probs = np.exp(logits[b] - logits[b].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep, mass = set(), 0.0
    for t in order:
      keep.add(t)
      mass += probs[t]
      if mass >= 0.7:
        break
    assert set(np.flatnonzero(np.isfinite(got_p[b]))) == keep
    np.testing.assert_allclose(got_p[b][list(keep)], logits[b][list(keep)])


def test_temperature_and_forbid_compose():
  logits = _logits(4)
  fn = procs.compose([procs.forbid_tokens([0, 5]), procs.temperature(2.0)])
  got = np.asarray(fn(jnp.asarray(logits), None))
  want = logits / 2.0
  want[:, [0, 5]] = -np.inf
  np.testing.assert_allclose(got, want)
