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


GLM130B = Convention("glm130b", gmask_id=GMASK)


@pytest.mark.parametrize("mask_id", [MASK, GMASK])
def test_glm130b_blank_filling_writes_each_span_back_like_generate_py(mask_id):
  """GLM-130B fills the first mask of the text, writes the span in its place and only then
  fills the next one, [MASK] spans at the mask's position, [gMASK] ones consecutive."""
  config = presets.get("tiny-glm130b")
  params = reference.lively_params(config, 3)
  texts = [[t if t != MASK else mask_id for t in text] for text in TEXTS]
  fills = fill_blanks(params, config, texts, mask_ids=(MASK, GMASK), sop_id=SOP, eop_id=EOP,
                      options=GenerationOptions(max_new_tokens=MAX_SPAN), return_logits=True,
                      convention=GLM130B)
  width = max(map(len, texts)) * (MAX_SPAN + 1) + MAX_SPAN + 2
  for text, fill in zip(texts, fills):
    spans, logits, final = reference.glm130b_fill_recompute(params, config, text, mask_id, SOP, EOP,
                                                            MAX_SPAN, width, gmask=mask_id == GMASK)
    assert fill.spans == spans
    assert fill.filled(text, (MASK, GMASK)) == final
    for got, want in zip(fill.logits, logits):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_glm130b_filling_differs_from_keeping_part_a():
  """The write-back changes what later spans see: GLM's append-to-cache fill differs."""
  config = presets.get("tiny-glm130b")
  params = reference.lively_params(config, 3)
  kept = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=EOP,
                     options=GenerationOptions(max_new_tokens=MAX_SPAN), return_logits=True)
  written = fill_blanks(params, config, TEXTS, mask_ids=(MASK,), sop_id=SOP, eop_id=EOP,
                        options=GenerationOptions(max_new_tokens=MAX_SPAN), return_logits=True,
                        convention=GLM130B)
  assert not np.allclose(kept[0].logits[1], written[0].logits[1])


def test_glm130b_refuses_texts_mixing_mask_kinds():
  config = presets.get("tiny-glm130b")
  with pytest.raises(ValueError, match="text 0 mixes mask kinds"):
    fill_blanks(reference.lively_params(config, 0), config, [[20, MASK, 21, GMASK]], mask_ids=(MASK, GMASK),
                sop_id=SOP, eop_id=EOP, convention=GLM130B)


def test_family_prompt_specials():
  """GLM generate_samples.py lines 196-204: [CLS] + text (+ [gMASK]) + eos unless it ends with
  [gMASK]; GLM-130B generate.py lines 72-76: eos unless it ends with a mask, no [CLS];
  ChatGLM-6B and causal families: none."""
  from glmjax.tasks import vocab  # pylint: disable=import-outside-toplevel
  ids = vocab.special_ids()
  CLS = 99
  glm = Convention.of(presets.get("glm-10b"), ids, cls_id=CLS)
  assert glm.prompt([20, ids.mask, 21]) == [CLS, 20, ids.mask, 21, ids.eos]
  assert glm.prompt([20, ids.mask]) == [CLS, 20, ids.mask, ids.eos]
  assert glm.prompt([20, ids.gmask]) == [CLS, 20, ids.gmask]
  glm130b = Convention.of(presets.get("glm-130b"), ids, cls_id=CLS)
  assert glm130b.prompt([20, ids.mask, 21]) == [20, ids.mask, 21, ids.eos]
  assert glm130b.prompt([20, ids.mask]) == [20, ids.mask]
  assert glm130b.prompt([20, ids.smask]) == [20, ids.smask]
  assert glm130b.prompt([20, ids.gmask]) == [20, ids.gmask]
  for name in ("chatglm-6b", "chatglm2-6b", "llama2-7b"):
    assert Convention.of(presets.get(name), ids, cls_id=CLS).prompt([20, ids.mask, 21]) == [20, ids.mask, 21]
  # Without GLM's [CLS] (the shipped vocabulary: a model trained here) a GLM prompt stays as is.
  assert Convention.of(presets.get("glm-large"), ids).prompt([20, ids.mask, 21]) == [20, ids.mask, 21]


def test_text_generator_prompts_with_the_family_specials():
  """`glmjax generate --mode blank` feeds the family's prompt (eos after a mid-text mask for
  GLM-130B) and answers with the user's text, its blanks filled."""
  from glmjax.generate.text import TextGenerator  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import vocab  # pylint: disable=import-outside-toplevel
  v = vocab.default_vocabulary()
  ids = v.special_ids
  config = presets.get("tiny-glm130b", vocab_size=v.vocab_size)
  params = reference.lively_params(config, 1)
  convention = Convention.of(config, ids)
  generator = TextGenerator(params, config, v, convention)
  prompt = "To be [MASK] to be"
  options = GenerationOptions(max_new_tokens=3)
  [answer] = generator.complete([prompt], options, mode="blank")
  encoded = v.encode(prompt)
  [fill] = fill_blanks(params, config, [convention.prompt(encoded)], mask_ids=(ids.mask, ids.smask, ids.gmask),
                       sop_id=ids.sop, eop_id=ids.eop,
                       options=GenerationOptions(max_new_tokens=3, stop_ids=(ids.eop, ids.eos)))
  assert convention.prompt(encoded)[-1] == ids.eos
  assert answer == v.decode(fill.filled(encoded, (ids.mask, ids.smask, ids.gmask)))
