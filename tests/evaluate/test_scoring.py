"""Multiple-choice and cloze scores equal log-probs computed token by token from plain forwards."""

import functools

import jax
import numpy as np
import pytest

from glmjax.evaluate import scoring
from glmjax.model import presets
from tests.generate import reference

MASK, SMASK, GMASK, SOP, EOP = 3, 4, 5, 6, 7
SPECIALS = scoring.Specials(mask_ids=(MASK, SMASK, GMASK), gmask=GMASK, sop=SOP, eop=EOP)
OPTIONS = [[30], [31, 32], [33, 34, 35]]


@functools.lru_cache(maxsize=None)
def _model(name):
  config = presets.get(name)
  return config, reference.lively_params(config, seed=9)


def _chain_rule(params, config, fields_of_prefix, option):
  """sum_k log p(option[k] | prefix + option[:k]), each term from its own forward."""
  total = 0.0
  for k in range(len(option)):
    fields = fields_of_prefix(option[:k])
    row = reference.last_logits(params, config, fields, 32)
    total += float(jax.nn.log_softmax(row)[option[k]])
  return total


def _glm_prefix(part_a, mask_index):
  def fields(option_prefix):
    b = [SOP] + list(option_prefix)
    a = len(part_a)
    return {"tokens": list(part_a) + b, "positions": list(range(a)) + [mask_index] * len(b),
            "block_positions": [0] * a + list(range(1, len(b) + 1)),
            "bidirectional": [1] * a + [0] * len(b)}
  return fields


def _causal_prefix(context):
  def fields(option_prefix):
    tokens = list(context) + list(option_prefix)
    n = len(tokens)
    return {"tokens": tokens, "positions": list(range(n)), "block_positions": [0] * n,
            "bidirectional": [0] * n}
  return fields


@pytest.mark.parametrize("context, part_a, mask_index", [
    ([20, 21, MASK, 22, 23], [20, 21, MASK, 22, 23], 2),     # the context's own blank
    ([20, 21, 22], [20, 21, 22, GMASK], 3),                    # none: [gMASK] appended (Flan format)
])
def test_blank_multiple_choice_matches_chain_rule(context, part_a, mask_index):
  config, params = _model("tiny-glm")
  [choice] = scoring.multiple_choice(params, config, [context], [OPTIONS], mode="blank",
                                     specials=SPECIALS)
  want = [_chain_rule(params, config, _glm_prefix(part_a, mask_index), o) for o in OPTIONS]
  np.testing.assert_allclose(choice.logprobs, want, rtol=1e-5, atol=1e-5)
  assert choice.best == int(np.argmax(want))
  [normed] = scoring.multiple_choice(params, config, [context], [OPTIONS], mode="blank",
                                     specials=SPECIALS, length_normalize=True)
  np.testing.assert_allclose(normed.scores, [w / len(o) for w, o in zip(want, OPTIONS)], rtol=1e-5)
  assert normed.best == int(np.argmax([w / len(o) for w, o in zip(want, OPTIONS)]))


def test_blank_scoring_with_eop_adds_its_logprob():
  config, params = _model("tiny-glm")
  context = [20, MASK, 22]
  [choice] = scoring.multiple_choice(params, config, [context], [OPTIONS], mode="blank",
                                     specials=SPECIALS, score_eop=True)
  want = [_chain_rule(params, config, _glm_prefix(context, 1), o + [EOP]) for o in OPTIONS]
  np.testing.assert_allclose(choice.logprobs, want, rtol=1e-5, atol=1e-5)


def test_append_multiple_choice_matches_chain_rule():
  config, params = _model("tiny-llama")
  contexts = [[40, 41, 42, 43], [50, 51]]
  choices = scoring.multiple_choice(params, config, contexts, [OPTIONS, OPTIONS[:2]], mode="append",
                                    specials=SPECIALS, batch_size=4)
  for context, opts, choice in zip(contexts, [OPTIONS, OPTIONS[:2]], choices):
    want = [_chain_rule(params, config, _causal_prefix(context), o) for o in opts]
    np.testing.assert_allclose(choice.logprobs, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, mode", [("tiny-glm", "blank"), ("tiny-llama", "append")])
def test_single_token_cloze_equals_multiple_choice(name, mode):
  config, params = _model(name)
  contexts = [[20, MASK, 22, 23], [60, 61, 62]]
  verbalizers = [[70, 71, 72], [73, 74, 75]]
  clozes = scoring.cloze(params, config, contexts, verbalizers, mode=mode, specials=SPECIALS)
  choices = scoring.multiple_choice(params, config, contexts, [[[t] for t in v] for v in verbalizers],
                                    mode=mode, specials=SPECIALS)
  for cl, ch in zip(clozes, choices):
    np.testing.assert_allclose(cl.scores, ch.logprobs, rtol=1e-5, atol=1e-5)
    assert cl.best == ch.best


def test_bad_options_are_rejected():
  config, params = _model("tiny-glm")
  with pytest.raises(ValueError, match="option 1 is empty"):
    scoring.multiple_choice(params, config, [[1, MASK]], [[[2], []]], specials=SPECIALS)
  with pytest.raises(ValueError, match="max_length"):
    scoring.multiple_choice(params, config, [[1] * 70 + [MASK]], [[[2]]], specials=SPECIALS)
