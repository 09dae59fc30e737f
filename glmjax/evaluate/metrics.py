"""Text metrics for generated answers: normalised exact match, chain-of-thought answer extraction."""

from __future__ import annotations

import re
import string
from typing import Optional, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(\s|$)")
_PUNCT = set(string.punctuation) | set("。，！？；：、（）")


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(gold)


def extract_cot_answer(text: str) -> Optional[str]:
  """X from the last "The answer is X." of a chain of thought: up to the end of that
  sentence or line ("3.5" keeps its decimal point); None when no answer is stated."""
  matches = list(_ANSWER_IS.finditer(text))
  if not matches:
    return None
  answer = text[matches[-1].end():].split("\n")[0]
  end = _SENTENCE_END.search(answer)
  return (answer[:end.start()] if end else answer).strip()


def first_line(text: str) -> str:
  return text.strip().split("\n")[0].strip()


def mean(values: Sequence[float]) -> float:
  return float(sum(values) / len(values)) if values else float("nan")
