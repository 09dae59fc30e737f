from glmjax.evaluate import metrics


def test_cot_answer_extraction():
  text = ("If all 54 animals were chickens there would be 108 legs. The answer is 12. "
          "Wait, recount: 76 / 2 = 38. The answer is 38.")
  assert metrics.extract_cot_answer(text) == "38"
  assert metrics.extract_cot_answer("So the answer is: As You Like It.\nNext") == "As You Like It"
  assert metrics.extract_cot_answer("The answer is 3.5. Done") == "3.5"
  assert metrics.extract_cot_answer("no conclusion here") is None


def test_exact_match_normalises_case_articles_and_punctuation():
  assert metrics.exact_match("The Tempest.", "tempest")
  assert metrics.exact_match("  38 ", "38")
  assert not metrics.exact_match("King Lear", "Macbeth")
