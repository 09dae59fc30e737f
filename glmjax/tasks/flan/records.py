"""Real datasets (glmjax.tasks.olmo_data) -> Flan QA records, and their fixed train/eval splits.

Every record is {id, question, options, answer, rationale} (formats.QA_FIELDS) plus
the dataset's own string fields that its templates use (premise, hypothesis,
passage, ...; `EXTRA_FIELDS`). `options` lists the choices one per line ("" for
open answers), `answer` is the correct choice's text (FLAN: the target is the
option string), `rationale` is GSM8K's worked solution (calculator annotations
<<...>> removed; "" elsewhere).

Splits (task splits "train" / "validation"):
  * datasets that ship one split (all but MMLU): `olmo_data.hash_split` of it,
    EVAL_FRACTION of the records to "validation", salt "glmjax.flan/<name>", keyed
    on the record's *input* text (`split_key`: question / premise + hypothesis /
    ...), so records that ask the same thing never straddle the two parts, and a
    record's side depends on nothing but its own text (not on order, not on the
    other records);
  * MMLU: "train" = dev (5 per subject, the few-shot pool), "validation" = test
    (the held-out benchmark); MMLU's own validation split is not used.
`id` is a 63-bit hash of (name, split_key): unique per distinct input, equal for
exact repeats (so a few-shot prompt never shows a repeat of the record asked).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any, Callable, Mapping

from glmjax.tasks import olmo_data

EVAL_FRACTION = 0.5
SPLITS = ("train", "validation")
SALT_PREFIX = "glmjax.flan/"

# The 57 MMLU subjects (hendrycks/test), listed so that registering tasks reads no file.
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")


def _sentence_case(text: str) -> str:
  text = text.strip()
  return text[:1].upper() + text[1:]


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _qa(question: str = "", options=(), answer: str = "", rationale: str = "", **extra) -> dict:
  """A QA record; options (and the answer, one of them) on one line each, whitespace collapsed."""
  return {"question": question, "options": "\n".join(_one_line(o) for o in options), "answer": _one_line(answer),
          "rationale": rationale, **extra}


def _choice_key(raw: Mapping[str, Any]) -> str:
  labels, texts = list(raw["choices"]["label"]), list(raw["choices"]["text"])
  return texts[labels.index(raw["answerKey"])]


def _lettered(raw: Mapping[str, Any], question_field: str = "question") -> dict:
  """ARC / OpenBookQA / CommonsenseQA / basic arithmetic: choices {label, text}, answerKey."""
  return _qa(raw[question_field].strip(), [t.strip() for t in raw["choices"]["text"]],
             _choice_key(raw).strip())


def _hellaswag_text(text: str) -> str:
  """lm-evaluation-harness's hellaswag `preprocess` (WikiHow markup removed)."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_rationale_and_answer(solution: str) -> tuple[str, str]:
  """'... <<3*3=9>>9 times\\n#### 540' -> ('... 9 times', '540'): GSM8K's own answer convention."""
  if solution.count("####") != 1:
    raise ValueError(f"a GSM8K solution has one '####' before its answer, got {solution!r}")
  steps, answer = solution.split("####")
  steps = _GSM8K_CALC.sub("", steps)
  return " ".join(line.strip() for line in steps.strip().splitlines() if line.strip()), answer.strip().replace(",", "")


def _gsm8k(raw):
  rationale, answer = gsm8k_rationale_and_answer(raw["answer"])
  return _qa(raw["question"].strip(), (), answer, rationale)


_YES_NO = ("yes", "no")
CB_OPTIONS = ("yes", "no", "it is not possible to tell")  # CB labels: entailment, contradiction, neutral


def _copa(raw):
  choices = (raw["choice1"], raw["choice2"])
  effect = raw["question"] == "effect"
  return _qa(raw["premise"], choices, choices[int(raw["label"])], premise=raw["premise"],
             relation=raw["question"], connective="so" if effect else "because",
             relation_question="What happened as a result?" if effect else "What was the cause?")


def _winogrande(raw):
  choices = (raw["option1"], raw["option2"])
  return _qa(raw["sentence"], choices, choices[int(raw["answer"]) - 1], sentence=raw["sentence"])


def _sciq(raw):
  # Options in an order fixed by the question's hash (the correct answer is not always first).
  choices = [raw["correct_answer"], raw["distractor1"], raw["distractor2"], raw["distractor3"]]
  shift = int(hashlib.sha256(raw["question"].encode("utf-8")).hexdigest(), 16) % 4
  choices = choices[shift:] + choices[:shift]
  return _qa(raw["question"].strip(), [c.strip() for c in choices], raw["correct_answer"].strip())


def _hellaswag(raw):
  context = _hellaswag_text(raw["activity_label"] + ": " + raw["ctx_a"] + " " + raw["ctx_b"].capitalize())
  endings = [_hellaswag_text(e) for e in raw["endings"]]
  return _qa(context, endings, endings[int(raw["label"])], context=context, activity=raw["activity_label"])


def _social_iqa(raw):
  choices = (raw["answerA"], raw["answerB"], raw["answerC"])
  return _qa(raw["question"], choices, choices[int(raw["label"]) - 1], context=raw["context"])


def _mmlu(raw, subject):
  choices = [str(c) for c in raw["choices"]]
  return _qa(raw["question"].strip(), choices, choices[int(raw["answer"])], subject=subject.replace("_", " "))


# name -> (raw record -> QA record). Answers of binary/ternary tasks are verbalised as FLAN does.
CONVERTERS: dict[str, Callable[[Mapping[str, Any]], dict]] = {
    "arc_easy": _lettered,
    "arc_challenge": _lettered,
    "openbookqa": functools.partial(_lettered, question_field="question_stem"),
    "commonsense_qa": _lettered,
    "basic_arithmetic": _lettered,
    "sciq": _sciq,
    "boolq": lambda r: _qa(_sentence_case(r["question"]) + "?", ("no", "yes"), "yes" if r["answer"] else "no",
                           passage=r["passage"]),
    "copa": _copa,
    "cb": lambda r: _qa(r["hypothesis"], CB_OPTIONS, CB_OPTIONS[int(r["label"])], premise=r["premise"],
                        hypothesis=r["hypothesis"]),
    "rte": lambda r: _qa(r["sentence2"], _YES_NO, _YES_NO[int(r["label"])], premise=r["sentence1"],
                         hypothesis=r["sentence2"]),
    "mrpc": lambda r: _qa(r["sentence2"], ("no", "yes"), ("no", "yes")[int(r["label"])],
                          sentence1=r["sentence1"], sentence2=r["sentence2"]),
    "sst2": lambda r: _qa(r["sentence"].strip(), ("negative", "positive"),
                          ("negative", "positive")[int(r["label"])], sentence=r["sentence"].strip()),
    "hellaswag": _hellaswag,
    "piqa": lambda r: _qa(r["goal"], (r["sol1"], r["sol2"]), (r["sol1"], r["sol2"])[int(r["label"])]),
    "social_iqa": _social_iqa,
    "winogrande": _winogrande,
    "nq_open": lambda r: _qa(_sentence_case(r["question"]) + "?", (), str(r["answer"][0]),
                             aliases="\n".join(r["answer"])),
    "triviaqa": lambda r: _qa(r["question"].strip(), (), r["answer"]["value"],
                              aliases="\n".join([r["answer"]["value"], *r["answer"]["aliases"]])),
    "gsm8k": _gsm8k,
}

# The dataset-specific fields each task serves (beyond formats.QA_FIELDS); templates may use them.
EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "boolq": ("passage",), "copa": ("premise", "relation", "connective", "relation_question"),
    "cb": ("premise", "hypothesis"), "rte": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "sst2": ("sentence",), "hellaswag": ("context", "activity"), "social_iqa": ("context",),
    "winogrande": ("sentence",), "nq_open": ("aliases",), "triviaqa": ("aliases",),
}
MMLU_EXTRA_FIELDS = ("subject",)


def dataset_names() -> list[str]:
  """Every dataset with Flan tasks: the 19 of olmo_data.SOURCES and the 57 mmlu_<subject>."""
  return sorted(CONVERTERS) + [f"mmlu_{s}" for s in MMLU_SUBJECTS]


def is_mmlu(name: str) -> bool:
  return name.startswith("mmlu_") and name[len("mmlu_"):] in MMLU_SUBJECTS


def extra_fields(name: str) -> tuple[str, ...]:
  return MMLU_EXTRA_FIELDS if is_mmlu(name) else EXTRA_FIELDS.get(name, ())


def check_name(name: str) -> str:
  if name not in CONVERTERS and not is_mmlu(name):
    raise ValueError(f"unknown Flan dataset {name!r}; known: {', '.join(sorted(CONVERTERS))}, "
                     "mmlu_<subject> (mmlu_abstract_algebra ... mmlu_world_religions)")
  return name


def convert(name: str, raw: Mapping[str, Any]) -> dict:
  """One raw record of dataset `name` -> its QA record (no id yet)."""
  if is_mmlu(name):
    return _mmlu(raw, name[len("mmlu_"):])
  return CONVERTERS[check_name(name)](raw)


# The fields whose text is the record's input: what split keys and ids are made of.
_KEY_FIELDS = ("question", "premise", "hypothesis", "passage", "sentence1", "sentence2", "context",
               "relation", "options")


def split_key(record: Mapping[str, Any]) -> str:
  """The input text of a converted record (not its answer): equal inputs share a side and an id."""
  return json.dumps({k: record[k] for k in _KEY_FIELDS if k in record}, sort_keys=True, ensure_ascii=False)


def record_id(name: str, record: Mapping[str, Any]) -> int:
  digest = hashlib.sha256(f"{name}\x00{split_key(record)}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") >> 1  # int64, non-negative


def salt(name: str) -> str:
  return SALT_PREFIX + name


@functools.lru_cache(maxsize=None)
def _converted(name: str, source_split: str | None) -> tuple[dict, ...]:
  out = []
  for raw in olmo_data.load_records(name, source_split):
    record = convert(name, raw)
    record["id"] = record_id(name, record)
    out.append(record)
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _split(name: str, split: str) -> tuple[dict, ...]:
  if is_mmlu(name):
    return _converted(name, {"train": "dev", "validation": "test"}[split])
  train, held = olmo_data.hash_split(_converted(name, None), EVAL_FRACTION, salt(name), key=split_key)
  return tuple(train if split == "train" else held)


def load_split(name: str, split: str) -> list[dict]:
  """The QA records of one task split ("train" / "validation"): fresh dicts, wheel order."""
  check_name(name)
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  return [dict(r) for r in _split(name, split)]


def num_examples(name: str, split: str = "train") -> int:
  return len(_split(check_name(name), split))
