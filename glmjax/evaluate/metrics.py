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


_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k.yaml "strict-match"
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # its "flexible-extract"


def _clean_number(text: str) -> str:
  """lm-eval gsm8k's regexes_to_ignore: ",", "$", a final "."."""
  text = text.replace(",", "").replace("$", "").strip()
  return text[:-1] if text.endswith(".") else text


def extract_gsm8k_answer(text: str, flexible: bool = True) -> Optional[str]:
  """The answer of a GSM8K solution: the number after "####" (GSM8K's own convention, lm-eval's
  strict match); else (`flexible`) the number of the last "The answer is N"; else the last
  number in the text (lm-eval's flexible extract). Commas, "$" and a final "." removed."""
  strict = _GSM8K_STRICT.search(text)
  if strict:
    return _clean_number(strict.group(1))
  if not flexible:
    return None
  stated = extract_cot_answer(text)
  if stated:
    numbers = _GSM8K_FLEXIBLE.findall(stated)
    if numbers:
      return _clean_number(next(g for g in numbers[0] if g))
  numbers = _GSM8K_FLEXIBLE.findall(text)
  for groups in reversed(numbers):
    value = _clean_number(next(g for g in groups if g))
    if value and value not in ("-", "."):
      return value
  return None


def first_line(text: str) -> str:
  return text.strip().split("\n")[0].strip()


def mean(values: Sequence[float]) -> float:
  return float(sum(values) / len(values)) if values else float("nan")
