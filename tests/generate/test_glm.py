"""GLM blank filling follows the spec: checked against a full forward built from it."""

import numpy as np
import pytest

from glmjax.generate import GenerationOptions
from glmjax.generate.glm import BlankFill, Convention, fill_blanks, generate_glm
from glmjax.model import presets
from tests.generate import reference

MASK, GMASK, SOP, EOP = 3, 5, 6, 7
TEXTS = [[20, 21, MASK, 22, 23, 24, MASK, 25], [30, MASK, 31, 32]]
MAX_SPAN = 4


def _check_against_spec(config, params, eop_id):
  fills = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=eop_id,
                      options=GenerationOptions(max_new_tokens=MAX_SPAN), return_logits=True)
  width = max(map(len, TEXTS)) + 2 * (MAX_SPAN + 1)
  for text, fill in zip(TEXTS, fills):
    spans, logits = reference.glm_fill_recompute(params, config, text, (MASK,), SOP, eop_id,
                                                 MAX_SPAN, width)
    assert fill.spans == spans
    for got, want in zip(fill.logits, logits):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  return fills


@pytest.mark.parametrize("name, seed", [("tiny-glm", 0), ("tiny-chatglm", 2)])
def test_blank_filling_matches_spec_reference(name, seed):
  config = presets.get(name)
  params = reference.lively_params(config, seed)
  fills = _check_against_spec(config, params, EOP)
  # Again with a later token of the first span declared the end of piece: the
  # span stops early and its <eop> must not be an input to the second span.
  span = fills[0].spans[0]
  cut = next(i for i in range(1, len(span)) if span[i] not in span[:i])
  fills = _check_against_spec(config, params, span[cut])
  assert fills[0].finished[0] and fills[0].spans[0] == span[:cut]


def test_gmask_generation_and_splicing():
  config = presets.get("tiny-glm")
  params = reference.lively_params(config, seed=2)
  text = [40, 41, 42]
  out = generate_glm(params, config, [text], gmask_id=GMASK, sop_id=SOP, eop_id=EOP,
                     options=GenerationOptions(max_new_tokens=3))
  spans, _ = reference.glm_fill_recompute(params, config, text + [GMASK], (GMASK,), SOP, EOP, 3, 12)
  assert out.sequences() == [spans[0]]
  fill = BlankFill(spans=[[8, 9], [10]], finished=[True, True])
  assert fill.filled([1, MASK, 2, MASK], (MASK,)) == [1, 8, 9, 2, 10]


def test_beam_search_blank_filling_one_beam_is_greedy():
  config = presets.get("tiny-glm")
  params = reference.lively_params(config, seed=5)
  greedy = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=EOP,
                       options=GenerationOptions(max_new_tokens=MAX_SPAN))
  beam = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=EOP,
                     options=GenerationOptions(max_new_tokens=MAX_SPAN, strategy="beam",
                                               num_beams=1, length_penalty=0.0))
  assert [f.spans for f in beam] == [f.spans for f in greedy]


def test_text_without_mask_is_rejected():
  config = presets.get("tiny-glm")
  with pytest.raises(ValueError, match="text 1 has no mask"):
    fill_blanks(reference.lively_params(config, 0), config, [[MASK, 1], [1, 2]], mask_ids=(MASK,),
                sop_id=SOP, eop_id=EOP)


def test_blank_filling_with_causal_1d_convention():
  """A LLaMA-style model (prompt_layout "causal") is prompted the way it was trained."""
  config = presets.get("tiny-llama")
  params = reference.lively_params(config, 4)
  fills = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=EOP,
                      options=GenerationOptions(max_new_tokens=MAX_SPAN), return_logits=True,
                      convention=Convention("causal"))
  width = max(map(len, TEXTS)) + 2 * (MAX_SPAN + 1)
  for text, fill in zip(TEXTS, fills):
    spans, logits = reference.glm_fill_recompute(params, config, text, (MASK,), SOP, EOP, MAX_SPAN,
                                                 width, bidirectional=False, positions_1d=True)
    assert fill.spans == spans
    for got, want in zip(fill.logits, logits):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
