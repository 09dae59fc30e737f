"""Synthetic chain-of-thought arithmetic word problems (English and Chinese).

Each record: {"id", "question", "options", "rationale", "answer"}: the
rationale is a worked solution whose numbers are computed, not templated
guesses, so `answer` is always right. `options` holds four choices (one line
each) for the multiple-choice variant, or "" for open questions. Generation
is a pure function of (split, index), so every machine builds the same data.
"""

from __future__ import annotations

import random

SPLIT_SIZES = {"train": 2000, "validation": 200}
_SPLIT_SEED = {"train": 1, "validation": 2}
_ID_BASE = {"train": 0, "validation": 1_000_000}
_NAMES = ["Ann", "Ben", "Chen", "Dora", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
_ITEMS = [("pen", "pens"), ("notebook", "notebooks"), ("apple", "apples"), ("book", "books"),
          ("cup", "cups"), ("ticket", "tickets")]


def chickens_and_rabbits(rng: random.Random) -> tuple[str, str, int]:
  chickens, rabbits = rng.randint(1, 40), rng.randint(1, 40)
  heads, legs = chickens + rabbits, 2 * chickens + 4 * rabbits
  question = (f"A farm has chickens and rabbits. Together they have {heads} heads and {legs} legs. "
              "How many rabbits are there?")
  rationale = (f"If all {heads} animals were chickens there would be 2 * {heads} = {2 * heads} legs. "
               f"There are {legs} - {2 * heads} = {legs - 2 * heads} more legs than that. "
               f"Each rabbit has 2 more legs than a chicken, so there are {legs - 2 * heads} / 2 = "
               f"{rabbits} rabbits (and {heads} - {rabbits} = {chickens} chickens).")
  return question, rationale, rabbits


def chickens_and_rabbits_zh(rng: random.Random) -> tuple[str, str, int]:
  chickens, rabbits = rng.randint(1, 40), rng.randint(1, 40)
  heads, legs = chickens + rabbits, 2 * chickens + 4 * rabbits
  question = f"鸡兔同笼，上有{heads}个头，下有{legs}只脚。鸡有几只？"
  rationale = (f"假设{heads}只全是兔，应有4 * {heads} = {4 * heads}只脚，比实际多{4 * heads} - {legs} = "
               f"{4 * heads - legs}只。每只鸡比兔少2只脚，所以鸡有{4 * heads - legs} / 2 = {chickens}只"
               f"（兔有{heads} - {chickens} = {rabbits}只）。")
  return question, rationale, chickens


def shopping(rng: random.Random) -> tuple[str, str, int]:
  name = rng.choice(_NAMES)
  (a1, a_plural), (b1, b_plural) = rng.sample(_ITEMS, 2)
  na, pa, nb, pb = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
  question = (f"{name} buys {na} {a_plural} at {pa} dollars each and {nb} {b_plural} at {pb} dollars each. "
              f"How many dollars does {name} spend?")
  rationale = (f"The {a_plural} cost {na} * {pa} = {na * pa} dollars. The {b_plural} cost {nb} * {pb} = "
               f"{nb * pb} dollars. Together that is {na * pa} + {nb * pb} = {na * pa + nb * pb} dollars.")
  return question, rationale, na * pa + nb * pb


def ages(rng: random.Random) -> tuple[str, str, int]:
  older, younger = rng.sample(_NAMES, 2)
  young_age, gap = rng.randint(3, 40), rng.randint(1, 30)
  total = 2 * young_age + gap
  question = (f"{older} is {gap} years older than {younger}. Together they are {total} years old. "
              f"How old is {younger}?")
  rationale = (f"Without the difference, the two ages add up to {total} - {gap} = {total - gap}. "
               f"Half of that is {younger}'s age: {total - gap} / 2 = {young_age}.")
  return question, rationale, young_age


def sharing(rng: random.Random) -> tuple[str, str, int]:
  name = rng.choice(_NAMES)
  baskets, each, left = rng.randint(2, 9), rng.randint(2, 12), 0
  left = rng.randint(0, baskets - 1)
  apples = baskets * each + left
  question = (f"{name} shares {apples} apples equally among {baskets} baskets, putting as many as possible "
              "in each. How many apples are left over?")
  rationale = (f"{baskets} * {each} = {baskets * each} is the largest multiple of {baskets} not above "
               f"{apples}, so each basket gets {each} apples and {apples} - {baskets * each} = {left} are left.")
  return question, rationale, left


def travel(rng: random.Random) -> tuple[str, str, int]:
  v1, t1, v2, t2 = rng.randint(3, 12) * 10, rng.randint(1, 5), rng.randint(3, 12) * 10, rng.randint(1, 5)
  question = (f"A train runs at {v1} km/h for {t1} hours and then at {v2} km/h for {t2} hours. "
              "How many kilometres does it travel?")
  rationale = (f"The first part covers {v1} * {t1} = {v1 * t1} km and the second {v2} * {t2} = {v2 * t2} km, "
               f"so {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} km in all.")
  return question, rationale, v1 * t1 + v2 * t2


PROBLEMS = (chickens_and_rabbits, chickens_and_rabbits_zh, shopping, ages, sharing, travel)


def _options(rng: random.Random, answer: int) -> list[str]:
  distractors = set()
  while len(distractors) < 3:
    candidate = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, answer // 2 + 1))
    if candidate >= 0 and candidate != answer:
      distractors.add(candidate)
  choices = [answer, *distractors]
  rng.shuffle(choices)
  return [str(c) for c in choices]


def problem(split: str, index: int) -> dict:
  """Record `index` of `split`; every third record is multiple choice."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"split={split!r} is not one of {sorted(SPLIT_SIZES)}")
  rng = random.Random(_SPLIT_SEED[split] * 10_000_019 + index)
  make = PROBLEMS[index % len(PROBLEMS)]
  question, rationale, answer = make(rng)
  options = "\n".join(_options(rng, answer)) if index % 3 == 2 else ""
  return {"id": _ID_BASE[split] + index, "question": question, "options": options,
          "rationale": rationale, "answer": str(answer)}


def problems(split: str, count: int | None = None) -> list[dict]:
  count = SPLIT_SIZES[split] if count is None else count
  return [problem(split, i) for i in range(count)]


def chat_conversation(record: dict) -> dict:
  """A ChatGLM3-style conversation about one problem; every other one calls a tool."""
  system = "You are a careful assistant. Show your reasoning, then give the answer."
  if record["id"] % 2:
    return {"roles": ["system", "user", "assistant"],
            "contents": [system, record["question"],
                         f"{record['rationale']} The answer is {record['answer']}."]}
  return {"roles": ["system", "user", "assistant", "observation", "assistant", "user", "assistant"],
          "contents": [system, record["question"], "Let me check the numbers with the calculator.",
                       f"calculator: {record['answer']}",
                       f"{record['rationale']} The answer is {record['answer']}.",
                       "Thanks! Just the number, please.", record["answer"]]}
