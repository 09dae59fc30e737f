"""FLAN-style templates of the real-dataset tasks (our own wording, FLAN's shape).

As in FLAN (Wei et al. 2021, google-research/FLAN `flan/templates.py`): several
(prompt, target) templates per dataset, one drawn per example; multiple-choice
prompts end in the option list ({options} renders "\\nOPTIONS:\\n- a\\n- b", ""
when a record has no options); a few templates per dataset "flip" the task
(the target is an input field, e.g. write the question for an answer), which
FLAN uses for diversity. A template is flipped iff its target lacks "{answer}"
(`is_flipped`); the few-shot format uses the zero-shot templates, CoT formats
the COT_TEMPLATES (target "{rationale} The answer is {answer}.", which
glmjax.evaluate.metrics.extract_cot_answer reads back).

Fields: {question} {options} {answer} {rationale} (formats.QA_FIELDS) and the
dataset's own fields (records.EXTRA_FIELDS).
"""

from __future__ import annotations

Template = tuple[str, str]

A = "{answer}"

_NLI = (  # premise / hypothesis, answer yes / no (/ it is not possible to tell)
    ("{premise}\n\nBased on the passage above, is it true that \"{hypothesis}\"?\n{options}", A),
    ("{premise}\n\nDoes the text above support this sentence?\n{hypothesis}\n{options}", A),
    ("Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail the hypothesis?\n{options}", A),
    ("Read the passage and decide whether the statement follows from it.\n\nPassage: {premise}\n\n"
     "Statement: {hypothesis}\n{options}", A),
    ("{premise}\nGiven the text above, can we conclude the following?\n{hypothesis}\n{options}", A),
    ("Decide if the sentence is true according to the text below.\n{hypothesis}\n\n{premise}\n{options}", A),
    ("Is the claim \"{hypothesis}\" backed up by this text: \"{premise}\"? Answer yes or no.", A),
    ("Write a short passage and a hypothesis about it.", "Passage: {premise}\n\nHypothesis: {hypothesis}"),
)

_CLOSED_BOOK_MC = (  # science / general questions with options
    ("{question}\n{options}", A),
    ("Question: {question}\n{options}\nAnswer:", A),
    ("Answer the following question by choosing one of the options.\n\n{question}\n{options}", A),
    ("{question}\n\nPick the right answer from the list below.\n{options}", A),
    ("Here is a question from a science exam: {question}\n{options}\nThe correct answer is", A),
    ("Q: {question}\nA:", A),
    ("Write a question whose correct answer is \"{answer}\".", "{question}"),
)

_OPEN_QA = (  # closed-book, open answer
    ("{question}", A),
    ("Question: {question}\nAnswer:", A),
    ("Answer this question.\n\n{question}", A),
    ("Please give a short answer: {question}", A),
    ("What is the answer to this question? {question}", A),
    ("Trivia question: {question}\nWhat is the answer?", A),
    ("Q: {question} A:", A),
    ("Write a trivia question whose answer is \"{answer}\".", "{question}"),
)

_MATH = (
    ("{question}", A),
    ("Solve this math problem.\n\n{question}", A),
    ("What is the answer to this problem?\n{question}", A),
    ("Math problem: {question}\nAnswer:", A),
    ("{question}\nGive the final answer only.", A),
    ("Problem: {question}\nThe answer is", A),
)

_MMLU = (
    ("The following is a multiple choice question about {subject}.\n\n{question}\n{options}", A),
    ("{question}\n{options}", A),
    ("Question ({subject}): {question}\n{options}\nAnswer:", A),
    ("Answer this {subject} question by choosing one of the options.\n{question}\n{options}", A),
    ("Here is an exam question on {subject}.\n{question}\nPick the correct option.\n{options}", A),
    ("{question}\n\nWhich of the options below is correct?\n{options}", A),
)

ZERO_SHOT: dict[str, tuple[Template, ...]] = {
    "rte": _NLI,
    "cb": _NLI,
    "mrpc": (
        ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\n\nDo these two sentences mean the same thing?\n{options}",
         A),
        ("\"{sentence1}\"\n\"{sentence2}\"\n\nAre the two sentences above paraphrases of each other?\n{options}", A),
        ("Is the second sentence a paraphrase of the first?\nFirst: {sentence1}\nSecond: {sentence2}\n{options}", A),
        ("{sentence1}\n{sentence2}\nDo both sentences say the same thing? Answer yes or no.", A),
        ("Here are two sentences:\n{sentence1}\n{sentence2}\nDo they have the same meaning?\n{options}", A),
        ("Check whether these sentences are semantically equivalent.\n\n{sentence1}\n\n{sentence2}\n{options}", A),
    ),
    "sst2": (
        ("Review: \"{sentence}\"\nIs this movie review positive or negative?\n{options}", A),
        ("{sentence}\n\nWhat is the sentiment of this sentence?\n{options}", A),
        ("How does the reviewer feel about the movie?\n\n{sentence}\n{options}", A),
        ("Movie review: {sentence}\nDid the critic like the film?\n{options}", A),
        ("Classify the sentiment of this text as positive or negative: {sentence}", A),
        ("\"{sentence}\"\nWould you describe this review as positive or negative?", A),
        ("Write a {answer} sentence from a movie review.", "{sentence}"),
    ),
    "copa": (
        ("{premise} {relation_question}\n{options}", A),
        ("Premise: {premise}\nWhat is the more plausible {relation}?\n{options}", A),
        ("\"{premise}\" Which of the options is the {relation} of this?\n{options}", A),
        ("Pick the more likely {relation} of the following event.\n\n{premise}\n{options}", A),
        ("Complete the sentence: {premise} This happened {connective}...\n{options}", A),
        ("{premise}\n\nWhat is the {relation}?", A),
        ("Given that \"{answer}\", write a sentence that this is the {relation} of.", "{premise}"),
    ),
    "hellaswag": (
        ("What happens next in this paragraph?\n\n{context}\n{options}", A),
        ("Continue the following text.\n\n{context}\n{options}", A),
        ("{context}\n\nHow does this paragraph most likely continue?\n{options}", A),
        ("Choose the most natural ending.\n{context}\n{options}", A),
        ("Here is the start of a description of {activity}:\n{context}\nWhat comes next?\n{options}", A),
        ("{context}", A),
        ("Write the beginning of a text about {activity} that continues with: \"{answer}\"", "{context}"),
    ),
    "piqa": (
        ("Goal: {question}\n\nWhich is the correct way to do it?\n{options}", A),
        ("How would you accomplish this: {question}\n{options}", A),
        ("{question}\n\nPick the most sensible solution.\n{options}", A),
        ("Here is a goal: {question}\nHow can it be achieved?\n{options}", A),
        ("What is the best way to do the following? {question}\n{options}", A),
        ("{question}", A),
        ("{answer}\n\nWhat goal does the text above achieve?", "{question}"),
    ),
    "social_iqa": (
        ("{context}\n\nQuestion: {question}\n{options}", A),
        ("Context: {context}\nQuestion: {question}\nWhich answer fits best?\n{options}", A),
        ("{context}\n{question}\n{options}\nAnswer:", A),
        ("Read the situation and answer the question.\n\n{context}\n\n{question}\n{options}", A),
        ("Given that {context} {question}\n{options}", A),
        ("{context} {question}", A),
        ("Context: {context}\nAnswer: {answer}\n\nWhat question does the answer respond to?", "{question}"),
    ),
    "winogrande": (
        ("Fill in the blank (_) in this sentence.\n\n{sentence}\n{options}", A),
        ("{sentence}\n\nWho or what does the _ stand for?\n{options}", A),
        ("Which option best replaces the _ in the sentence below?\n{sentence}\n{options}", A),
        ("Sentence: {sentence}\nThe blank refers to which of these?\n{options}", A),
        ("Complete the sentence by choosing the right word for the blank: {sentence}\n{options}", A),
        ("{sentence}\nWhat goes in the blank?", A),
        ("Write a sentence with a blank (_) that \"{answer}\" fills.", "{sentence}"),
    ),
    "commonsense_qa": (
        ("{question}\n{options}", A),
        ("Use common sense to answer: {question}\n{options}", A),
        ("Question: {question}\n{options}\nAnswer:", A),
        ("{question}\n\nWhich option is the most sensible answer?\n{options}", A),
        ("Pick the answer that makes the most sense.\n{question}\n{options}", A),
        ("Q: {question}\nA:", A),
        ("Write a common-sense question whose answer is \"{answer}\".", "{question}"),
    ),
    "arc_easy": _CLOSED_BOOK_MC,
    "arc_challenge": _CLOSED_BOOK_MC,
    "openbookqa": (
        ("{question}\n{options}", A),
        ("Complete the sentence with the best option: {question}\n{options}", A),
        ("Science fact check. {question}\n{options}\nAnswer:", A),
        ("Choose the option that correctly completes or answers this.\n\n{question}\n{options}", A),
        ("{question}\n\nWhich of these is right?\n{options}", A),
        ("{question}", A),
        ("Write a science question whose correct answer is \"{answer}\".", "{question}"),
    ),
    "sciq": _CLOSED_BOOK_MC,
    "nq_open": _OPEN_QA,
    "triviaqa": _OPEN_QA,
    "boolq": (
        ("{passage}\n\nBased on the passage, answer the question: {question}\n{options}", A),
        ("Read the text and answer yes or no.\n\n{passage}\n\nQuestion: {question}", A),
        ("Passage: {passage}\n\nQuestion: {question}\n{options}\nAnswer:", A),
        ("{passage}\n\nIs the following true? {question}\n{options}", A),
        ("Here is an article:\n{passage}\n\nUsing it, answer: {question}\n{options}", A),
        ("{passage}\n{question}", A),
        ("{passage}\n\nWrite a yes/no question about this text whose answer is \"{answer}\".", "{question}"),
    ),
    "basic_arithmetic": _MATH + (("{question}\n{options}", A), ("Compute the result.\n{question}\n{options}", A)),
    "gsm8k": _MATH,
}

COT_TEMPLATES: tuple[Template, ...] = (
    ("{question}\nLet's think step by step.", "{rationale} The answer is {answer}."),
    ("Q: {question}\nA: Let's think step by step.", "{rationale} The answer is {answer}."),
    ("Solve the following problem, showing your reasoning.\n{question}", "{rationale} The answer is {answer}."),
    ("Math word problem: {question}\nWork it out step by step, then give the answer.",
     "{rationale} The answer is {answer}."),
    ("{question}\n\nExplain your reasoning before stating the answer.", "{rationale} The answer is {answer}."),
    ("Question: {question}\nReason it through, then answer.", "{rationale} The answer is {answer}."),
)

COT_DATASETS = ("gsm8k",)  # datasets whose records carry a rationale


def zero_shot_templates(name: str) -> tuple[Template, ...]:
  return _MMLU if name.startswith("mmlu_") else ZERO_SHOT[name]


def templates(name: str, fmt: str) -> tuple[Template, ...]:
  """The templates of dataset `name` in Flan format `fmt`."""
  if fmt in ("cot", "few_shot_cot"):
    if name not in COT_DATASETS:
      raise ValueError(f"dataset {name!r} has no rationale; CoT formats exist for {COT_DATASETS}")
    return COT_TEMPLATES
  return zero_shot_templates(name)


def is_flipped(template: Template) -> bool:
  """A flipped template asks for an input field (FLAN's inverted templates), not the answer."""
  return "{answer}" not in template[1]
