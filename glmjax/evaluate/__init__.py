"""Evaluation: GLM-style scoring on token ids, text metrics, task runs and the CLI."""

from glmjax.evaluate.metrics import exact_match, extract_cot_answer, normalize_answer
from glmjax.evaluate.scoring import Choice, LMTotals, Specials, cloze, multiple_choice, score_rows


def main(argv=None) -> int:
  """`glmjax eval` (see glmjax.evaluate.cli)."""
  from glmjax.evaluate import cli  # pylint: disable=import-outside-toplevel
  return cli.main(argv)
