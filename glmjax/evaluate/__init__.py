"""Evaluation: GLM-style scoring on token ids, text metrics and task runs."""

from glmjax.evaluate.metrics import exact_match, extract_cot_answer, normalize_answer
from glmjax.evaluate.scoring import Choice, LMTotals, Specials, cloze, multiple_choice, score_rows

