"""Decoding strategies: beam 1 / top-k 1 equal greedy, seeds reproduce, beam search is exact
where the beam holds every candidate, stop tokens and streaming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.generate import GenerationOptions, generate
from glmjax.model import forward, presets
from tests.generate import reference

PROMPTS = [[5, 17, 33, 2, 90], [12, 64]]


@functools.lru_cache(maxsize=None)
def _model():
  config = presets.get("tiny-llama")
  return config, reference.lively_params(config, seed=7)


def _run(**kw):
  config, params = _model()
  return generate(params, config, PROMPTS, GenerationOptions(**kw))


def test_beam_one_equals_greedy_without_stop_tokens():
  greedy = _run(max_new_tokens=6)
  beam = _run(max_new_tokens=6, strategy="beam", num_beams=1, length_penalty=1.0)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)


def test_beam_one_equals_greedy_with_a_stop_token():
  greedy = _run(max_new_tokens=6)
  stop = int(greedy.tokens[0, 3])
  greedy = _run(max_new_tokens=6, stop_ids=(stop,))
  beam = _run(max_new_tokens=6, stop_ids=(stop,), strategy="beam", num_beams=1, length_penalty=0.0)
  assert greedy.finished[0] and greedy.sequences(strip_stop=False)[0][-1] == stop
  assert beam.sequences(strip_stop=False) == greedy.sequences(strip_stop=False)
  np.testing.assert_array_equal(beam.finished, greedy.finished)


def test_top_k_one_equals_greedy():
  greedy = _run(max_new_tokens=6)
  sampled = _run(max_new_tokens=6, strategy="sample", top_k=1, temperature=0.7, seed=3)
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_seed_reproduces_samples():
  a = _run(max_new_tokens=8, strategy="sample", temperature=1.5, top_p=0.95, seed=11)
  b = _run(max_new_tokens=8, strategy="sample", temperature=1.5, top_p=0.95, seed=11)
  c = _run(max_new_tokens=8, strategy="sample", temperature=1.5, top_p=0.95, seed=12)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def _sequence_logprob(params, config, prompt, continuation):
  tokens = jnp.asarray([list(prompt) + list(continuation)], jnp.int32)
  logp = jax.nn.log_softmax(forward(params, {"tokens": tokens}, config)[0], axis=-1)
  n = len(prompt)
  return float(sum(logp[n - 1 + i, t] for i, t in enumerate(continuation)))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_with_every_candidate_is_exhaustive_search(length_penalty):
  """Two steps, num_beams = vocab: the beam holds every first token, so it must find the
  best of all V + (V - 1) * V sequences under score = logp / len ** length_penalty."""
  config, params = _model()
  prompt, V = PROMPTS[1], config.vocab_size
  stop = int(np.argsort(np.asarray(forward(params, {"tokens": jnp.asarray([prompt])}, config))[0, -1])[-3])
  result = generate(params, config, [prompt], GenerationOptions(
      max_new_tokens=2, strategy="beam", num_beams=V, stop_ids=(stop,), length_penalty=length_penalty))

  first = jax.nn.log_softmax(forward(params, {"tokens": jnp.asarray([prompt])}, config)[0, -1])
  pairs = jnp.asarray([prompt + [t] for t in range(V)], jnp.int32)
  second = jax.nn.log_softmax(forward(params, {"tokens": pairs}, config)[:, -1], axis=-1)
  scores = {(stop,): float(first[stop])}
  for t in range(V):
    if t != stop:
      for u in range(V):
        scores[(t, u)] = (float(first[t]) + float(second[t, u])) / 2 ** length_penalty
  best = max(scores, key=scores.get)
  assert tuple(result.sequences(strip_stop=False)[0]) == best
  np.testing.assert_allclose(result.scores[0], scores[best], rtol=1e-5)
  if len(best) == 2:
    np.testing.assert_allclose(_sequence_logprob(params, config, prompt, best),
                               scores[best] * 2 ** length_penalty, rtol=1e-5)


def test_forbidden_ids_never_emitted():
  greedy = _run(max_new_tokens=6)
  banned = tuple(sorted(set(int(t) for t in greedy.tokens.ravel())))
  out = _run(max_new_tokens=6, forbidden_ids=banned)
  assert not set(out.tokens.ravel().tolist()) & set(banned)


def test_stop_token_ends_a_row_and_pads():
  greedy = _run(max_new_tokens=6)
  stop = int(greedy.tokens[1, 2])
  out = _run(max_new_tokens=6, stop_ids=(stop,), pad_id=0)
  first = greedy.tokens[1].tolist().index(stop)
  assert out.lengths[1] == first + 1 and out.finished[1]
  assert out.tokens[1, first + 1:].tolist() == [0] * (6 - first - 1)
  assert out.sequences()[1] == greedy.tokens[1, :first].tolist()


def test_streaming_callback_sees_every_token_in_order():
  config, params = _model()
  seen = []
  out = generate(params, config, PROMPTS, GenerationOptions(max_new_tokens=5, strategy="sample", seed=1),
                 on_token=lambda step, tokens, done: seen.append((int(step), np.asarray(tokens).copy())))
  assert [s for s, _ in seen] == list(range(5))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out.tokens)
