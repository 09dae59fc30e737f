"""Real tasks evaluated as lm-evaluation-harness does (`harness:<task>`), and GLM-style cloze
(`cloze:<task>`), over the datasets of glmjax.tasks.olmo_data (offline).

`harness:` tasks reproduce lm-eval 0.4.13's task configs (lm_eval/tasks/<task>/*.yaml and
their utils.py), so the numbers compare with the ones people quote:

  arc_easy, arc_challenge  "Question: {question}\\nAnswer:" -> " " + choice text
  boolq                    "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" / " yes"
  copa                     premise without its final period + " because" / " therefore"
                           -> " " + choice with its first letter lower-cased
  hellaswag                preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
                           -> " " + preprocess(ending)  (" [title]" -> ". ", [..] dropped, "  " -> " ")
  piqa                     "Question: {goal}\\nAnswer:" -> " " + sol1 / sol2
  sciq                     "{support.lstrip()}\\nQuestion: {question}\\nAnswer:" -> distractor1..3,
                           correct_answer (gold = index 3)
  openbookqa               "{question_stem}" -> " " + choice text
  winogrande               partial scoring: one context per option (sentence up to "_" with the
                           option filled in), the shared continuation " " + the rest of the sentence
  mmlu_<subject>, mmlu     description "The following are multiple choice questions (with answers)
                           about {subject with spaces}.\\n\\n" + "{question.strip()}\\nA. ..\\nB. ..
                           \\nC. ..\\nD. ..\\nAnswer:" -> " A" .. " D"; few-shot: the first k of dev
  gsm8k                    "Question: {question}\\nAnswer:", greedy generation until "Question:",
                           exact match of the extracted number (metrics.extract_gsm8k_answer)

Few-shot (k = --num_fewshot): exemplars rendered "{text} {answer}" and joined with "\\n\\n" before
the asked text (harness's target_delimiter " " and fewshot_delimiter "\\n\\n"). They come from a
training pool that never contains the example asked: for the datasets shipping one split, the
shipped split is cut by a salted hash (olmo_data.hash_split, EVAL_FRACTION, salt
"glmjax.flan/<name>" -- the same cut as the Flan training tasks when their split key is
importable) into a few-shot pool ("train") and the evaluated part ("validation"); MMLU's pool is
its dev split, the evaluated part its test split. Exemplars are drawn as harness's default
sampler draws them when it is handed the evaluated document (lm-eval does so when the config's
fewshot split equals its test split, None == None for a config with neither, as the parity
configs): one random.Random(1234) for the task, per evaluated document in order
`rnd.sample(pool, k + 1)`, the document removed, the first k kept (MMLU: sampler first_n, the
first k of dev); so with the same documents both draw the same exemplars.

Scoring: multiple choice by the summed log-probability of each continuation (`acc`) and by that
sum divided by the continuation's length in characters (`acc_norm`, harness's
`completion_len = len(choice)`), and in UTF-8 bytes (`acc_bytes`). Token split as HFLM's
`_encode_pair`: trailing spaces of the context move to the continuation; the continuation's
tokens are those of encode(context + continuation) past len(encode(context)). Causal models
score the continuation appended to the context (scoring.append_row); blank-infilling GLM models
fill it into a [gMASK] after the context (Part B), as scoring.option_rows(mode="blank").

`cloze:` tasks are the GLM paper's SuperGLUE formulation (PET patterns; the answer fills a
[MASK] in the pattern, scored as GLM fills a blank; a causal model scores the text up to the
mask and the verbalizer appended to it):

  cloze:boolq   "{passage}. Question: {question}? Answer: [MASK]."   verbalizers "No" / "Yes"
  cloze:copa    '"{choice1}" or "{choice2}"? {premise without period}, {so|because} [MASK].'
                the choices themselves (first letter lower-cased, period dropped) fill the mask
  cloze:rte     '"{hypothesis}"? [MASK], "{premise}"'   verbalizers "Yes" / "No"
  cloze:cb      '"{hypothesis}"? [MASK], "{premise}"'   verbalizers "Yes" / "No" / "Maybe"

Rows are bucketed by length (BUCKETS) and scored in fixed [batch, bucket] shapes: one compile
per bucket actually used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from glmjax.evaluate import metrics as metrics_lib
from glmjax.evaluate import scoring

EVAL_FRACTION = 0.5
SALT_PREFIX = "glmjax.flan/"
FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")

CLUSTERS = {  # the names of glmjax.tasks.flan.CLUSTERS
    "nli": ("rte", "cb"),
    "commonsense": ("copa", "hellaswag", "piqa", "winogrande"),
    "closed_book_qa": ("arc_easy", "arc_challenge", "openbookqa", "sciq"),
    "reading_comprehension": ("boolq",),
    "math": ("gsm8k",),
    "mmlu": (),  # every mmlu_<subject>
}


def cluster_of(dataset: str) -> str:
  if dataset.startswith("mmlu_"):
    return "mmlu"
  return next((c for c, members in CLUSTERS.items() if dataset in members), "other")


# --- Documents (the harness dataset's schema) --------------------------------------------------

def _int(value) -> int:
  return int(value) if not isinstance(value, str) else int(value.strip())


def _bool_label(value) -> int:
  if isinstance(value, str):
    return int(value.strip().lower() in ("true", "1", "yes"))
  return int(bool(value))


def _as_list(value) -> list:
  return list(value) if not isinstance(value, str) else json.loads(value)


def to_doc(dataset: str, record: dict) -> dict:
  """An olmo_data record in the schema of the dataset lm-eval's config reads (HF hub's)."""
  r = dict(record)
  if dataset == "boolq":  # google boolq {question, answer, passage} -> super_glue {.., label}
    return {"question": r["question"], "passage": r["passage"], "label": _bool_label(r["answer"])}
  if dataset in ("copa", "piqa", "rte", "cb"):
    r["label"] = _int(r["label"])
  if dataset == "hellaswag":
    r["label"] = str(r["label"])
    r["endings"] = _as_list(r["endings"])
  if dataset.startswith("mmlu_"):
    r["answer"] = _int(r["answer"])
    r["choices"] = _as_list(r["choices"])
  if dataset in ("arc_easy", "arc_challenge", "openbookqa"):
    r["choices"] = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
  if dataset == "winogrande":
    r["answer"] = str(r["answer"])
  return r


# --- lm-eval's task configs, written out ---------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
  """lm_eval/tasks/hellaswag/utils.py preprocess."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  text = text.replace("  ", " ")
  return text


def _copa_choice(choice: str) -> str:
  return choice[0].lower() + choice[1:]


def _mmlu_description(subject: str) -> str:
  return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One document as harness renders it: `texts` (one, or one per option for multiple-input
  tasks), `choices` (continuations without the delimiter), `gold` index, `answer` (the text an
  exemplar shows after the delimiter)."""
  texts: tuple
  choices: tuple
  gold: int
  answer: str


def render(dataset: str, doc: dict) -> Rendered:
  """doc_to_text / doc_to_choice / doc_to_target of lm-eval 0.4.13's config of `dataset`."""
  d = doc
  if dataset in ("arc_easy", "arc_challenge"):
    choices = tuple(d["choices"]["text"])
    gold = d["choices"]["label"].index(d["answerKey"])
    return Rendered((f"Question: {d['question']}\nAnswer:",), choices, gold, choices[gold])
  if dataset == "openbookqa":
    choices = tuple(d["choices"]["text"])
    gold = d["choices"]["label"].index(d["answerKey"].lstrip())
    return Rendered((d["question_stem"],), choices, gold, choices[gold])
  if dataset == "boolq":
    choices = ("no", "yes")
    return Rendered((f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",), choices, d["label"],
                    choices[d["label"]])
  if dataset == "copa":
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    text = d["premise"].strip()[:-1] + f" {connector}"
    # utils.doc_to_choice puts the space inside the choice; the target delimiter adds another
    choices = (" " + _copa_choice(d["choice1"]), " " + _copa_choice(d["choice2"]))
    return Rendered((text,), choices, d["label"], choices[d["label"]])
  if dataset == "hellaswag":
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    choices = tuple(hellaswag_preprocess(e) for e in d["endings"])
    gold = int(d["label"])
    return Rendered((hellaswag_preprocess(d["activity_label"] + ": " + ctx),), choices, gold,
                    choices[gold])
  if dataset == "piqa":
    choices = (d["sol1"], d["sol2"])
    return Rendered((f"Question: {d['goal']}\nAnswer:",), choices, d["label"], choices[d["label"]])
  if dataset == "sciq":
    choices = (d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"])
    return Rendered((f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",), choices, 3,
                    choices[3])
  if dataset == "winogrande":
    idx = d["sentence"].index("_")
    texts = tuple(d["sentence"][:idx] + o for o in (d["option1"], d["option2"]))
    rest = d["sentence"][idx + 1:].strip()
    gold = {"1": 0, "2": 1}[d["answer"]]
    return Rendered(texts, (rest,), gold, rest)
  if dataset.startswith("mmlu_"):
    c = d["choices"]
    text = (f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    choices = ("A", "B", "C", "D")
    return Rendered((text,), choices, d["answer"], choices[d["answer"]])
  if dataset == "gsm8k":
    return Rendered((f"Question: {d['question']}\nAnswer:",), (), -1, d["answer"])
  raise KeyError(dataset)


HARNESS_DATASETS = ("arc_easy", "arc_challenge", "boolq", "copa", "hellaswag", "piqa", "sciq",
                    "openbookqa", "winogrande", "gsm8k")
CLOZE_DATASETS = ("boolq", "copa", "rte", "cb")
NAMESPACES = ("harness", "cloze")


def description(dataset: str) -> str:
  return _mmlu_description(dataset[len("mmlu_"):]) if dataset.startswith("mmlu_") else ""


def multiple_input(dataset: str) -> bool:
  return dataset == "winogrande"


# --- Splits and few-shot -----------------------------------------------------------------------

def _flan_side_fn(dataset: str) -> Optional[Callable[[dict], bool]]:
  """Whether a raw record is on the Flan training tasks' eval side, by their own split key
  (glmjax.tasks.flan.records), so `harness:` never evaluates what Flan tuning trained on."""
  try:
    from glmjax.tasks.flan import records  # pylint: disable=import-outside-toplevel
    from glmjax.tasks import olmo_data  # pylint: disable=import-outside-toplevel
    convert, split_key, salt, fraction = (records.convert, records.split_key, records.salt,
                                          records.EVAL_FRACTION)
  except (ImportError, AttributeError):
    return None

  def held(raw: dict) -> bool:
    return olmo_data.stable_fraction(split_key(convert(dataset, dict(raw))), salt(dataset)) < fraction
  return held


def split_docs(dataset: str) -> tuple[list[dict], list[dict], str]:
  """(few-shot pool, evaluated docs, how they were split), docs in the harness schema."""
  from glmjax.tasks import olmo_data  # pylint: disable=import-outside-toplevel
  if dataset.startswith("mmlu_"):
    return ([to_doc(dataset, r) for r in olmo_data.load_records(dataset, "dev")],
            [to_doc(dataset, r) for r in olmo_data.load_records(dataset, "test")], "mmlu dev / test")
  raw = olmo_data.load_records(dataset)
  held = _flan_side_fn(dataset)
  how = "glmjax.tasks.flan.records split key"
  if held is not None:
    try:
      sides = [held(r) for r in raw]
    except Exception:  # pylint: disable=broad-except  (their converter does not know this set)
      held = None
  if held is None:
    how = "olmo_data.record_key"
    pool, evaluated = olmo_data.hash_split(raw, EVAL_FRACTION, SALT_PREFIX + dataset)
  else:
    pool = [r for r, s in zip(raw, sides) if not s]
    evaluated = [r for r, s in zip(raw, sides) if s]
  how = f"hash_split(eval_fraction={EVAL_FRACTION}, salt={SALT_PREFIX + dataset!r}, key={how})"
  return [to_doc(dataset, r) for r in pool], [to_doc(dataset, r) for r in evaluated], how


def fewshot_exemplars(dataset: str, pool: Sequence[dict], docs: Sequence[dict], k: int,
                      seed: int = FEWSHOT_SEED) -> list[list[dict]]:
  """The k exemplars of each doc, drawn as lm-eval's samplers draw them (module doc). An
  exemplar equal to the doc asked is dropped and redrawn (never shown)."""
  if k <= 0:
    return [[] for _ in docs]
  if k > len(pool):
    raise ValueError(f"{dataset}: --num_fewshot {k} but the few-shot pool has {len(pool)} documents")
  if dataset.startswith("mmlu_"):  # sampler first_n
    return [[x for x in pool if x != doc][:k] for doc in docs]
  rnd = random.Random(seed)
  pool = list(pool)
  out = []
  for doc in docs:  # ContextSampler.sample with eval_doc: k + 1 drawn, the doc removed, k kept
    shots = [x for x in rnd.sample(pool, k + 1) if x != doc][:k]
    if len(shots) < k:
      shots = rnd.sample([x for x in pool if x != doc], k)
    out.append(shots)
  return out


def contexts(dataset: str, doc: dict, shots: Sequence[dict]) -> list[str]:
  """The prompt(s) of `doc` after its exemplars: one, or one per option (multiple input)."""
  prefix = description(dataset)
  for shot in shots:
    r = render(dataset, shot)
    text = r.texts[r.gold] if multiple_input(dataset) else r.texts[0]
    prefix += text + TARGET_DELIMITER + r.answer + FEWSHOT_DELIMITER
  return [prefix + text for text in render(dataset, doc).texts]


@dataclasses.dataclass(frozen=True)
class Request:
  """One log-likelihood request, as lm-eval's Instance arguments: (context, continuation)."""
  doc: int
  option: int
  context: str
  continuation: str


def requests(dataset: str, doc_index: int, doc: dict, shots: Sequence[dict]) -> list[Request]:
  r = render(dataset, doc)
  ctxs = contexts(dataset, doc, shots)
  if multiple_input(dataset):
    return [Request(doc_index, i, c, TARGET_DELIMITER + r.choices[0]) for i, c in enumerate(ctxs)]
  return [Request(doc_index, i, ctxs[0], TARGET_DELIMITER + c) for i, c in enumerate(r.choices)]


# --- Tokens --------------------------------------------------------------------------------------

class Tokens:
  """Text <-> ids for one model: an HF tokenizer (imported models) or a GLMVocabulary."""

  def __init__(self, encode: Callable[[str], list], decode: Callable[[list], str], *, eos_ids=(),
               specials: Optional[scoring.Specials] = None, kind: str = "hf"):
    self.encode, self.decode, self.eos_ids, self.specials, self.kind = encode, decode, tuple(eos_ids), specials, kind

  @classmethod
  def from_hf(cls, folder: str) -> "Tokens":
    import transformers  # pylint: disable=import-outside-toplevel
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    eos = [i for i in (tok.eos_token_id,) if i is not None]
    return cls(lambda s: list(tok.encode(s)), lambda ids: tok.decode(ids, skip_special_tokens=True),
               eos_ids=eos, kind="hf")

  @classmethod
  def from_vocabulary(cls, vocabulary) -> "Tokens":
    ids = vocabulary.special_ids
    return cls(lambda s: list(vocabulary.encode(s)), lambda t: vocabulary.decode(t),
               eos_ids=(ids.eos, ids.eop), specials=scoring.Specials.from_ids(ids), kind="glm")


def encode_pair(tokens: Tokens, context: str, continuation: str) -> tuple[list, list]:
  """lm_eval.api.model.TemplateLM._encode_pair (causal)."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces > 0:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = tokens.encode(context + continuation)
  ctx = tokens.encode(context)
  return ctx, whole[len(ctx):]


# --- Scoring -------------------------------------------------------------------------------------

def bucket_of(n: int, max_length: int) -> int:
  for b in BUCKETS:
    if n <= b:
      return min(b, max_length)
  return max_length


def score_bucketed(params, config, rows: Sequence[dict], batch_size: int) -> list[scoring.RowScore]:
  """score_rows over rows grouped by length bucket (longest first): [batch_size, bucket] shapes."""
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["tokens"]))
  groups: dict = {}
  for i in order:
    groups.setdefault(bucket_of(len(rows[i]["tokens"]), config.max_length), []).append(i)
  out: list = [None] * len(rows)
  for length, members in groups.items():
    scores = scoring.score_rows(params, config, [rows[i] for i in members], batch_size=batch_size,
                                length=length)
    for i, s in zip(members, scores):
      out[i] = s
  return out


def _keep_last(ids: list, room: int) -> list:
  """The last `room` ids (left truncation, as lm-eval's HFLM), at least one."""
  room = max(1, room)
  return list(ids[max(0, len(ids) - room):])


def request_rows(tokens: Tokens, reqs: Sequence[Request], mode: str, convention=None,
                 max_length: int = 0) -> list[dict]:
  rows = []
  for req in reqs:
    ctx, cont = encode_pair(tokens, req.context, req.continuation)
    if not cont:
      raise ValueError(f"empty continuation for {req.continuation!r}")
    if mode == "append":
      if max_length:  # HFLM: (context + continuation)[-(max_length + 1):][:-1]
        ctx = _keep_last(ctx, max_length + 1 - len(cont))
      rows.append(scoring.append_row(ctx, cont))
    else:  # Part A = context + [gMASK], Part B = <sop> + continuation: len(ctx) + 1 + len(cont)
      if max_length:
        ctx = _keep_last(ctx, max_length - 1 - len(cont))
      kwargs = {} if convention is None else {"convention": convention}
      rows += scoring.option_rows(ctx, [cont], mode="blank", specials=tokens.specials, **kwargs)
  return rows


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
  """acc, acc_norm (by characters, as lm-eval), acc_bytes (by UTF-8 bytes) of one document."""
  lls = np.asarray(lls, np.float64)
  chars = np.array([float(len(c)) for c in choices])
  nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
  return {"acc": float(int(np.argmax(lls)) == gold),
          "acc_norm": float(int(np.argmax(lls / chars)) == gold),
          "acc_bytes": float(int(np.argmax(lls / nbytes)) == gold)}


# --- Runs ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HarnessConfig:
  num_fewshot: int = 0
  limit: int = 0  # first N evaluated documents; 0: all
  batch_size: int = 8
  mode: str = "append"  # append (causal models) | blank (GLM: the continuation fills a [gMASK])
  max_new_tokens: int = 256  # gsm8k (lm-eval's max_gen_toks)
  seed: int = FEWSHOT_SEED
  log_samples: int = 0  # keep this many rendered prompts per task in the results


def split_limit(name: str) -> tuple[str, Optional[int]]:
  """'harness:boolq@40' -> ('harness:boolq', 40): a per-task --limit; no '@': (name, None)."""
  base, at, n = name.partition("@")
  if not at:
    return name, None
  if not n.isdigit():
    raise ValueError(f"{name!r}: the limit after '@' must be a whole number of documents")
  return base, int(n)


def parse_task(name: str) -> tuple[str, str]:
  """'harness:arc_easy' -> ('harness', 'arc_easy'); 'harness:mmlu' stays whole (expand_names)."""
  namespace, _, dataset = split_limit(name)[0].partition(":")
  if namespace not in NAMESPACES or not dataset:
    raise ValueError(f"{name!r} is not <namespace>:<task> with namespace one of {NAMESPACES}")
  return namespace, dataset


def expand_names(names: Sequence[str]) -> list[str]:
  """Checks every name; 'harness:mmlu' becomes its 57 subjects. Unknown -> ValueError."""
  from glmjax.tasks import olmo_data  # pylint: disable=import-outside-toplevel
  out = []
  for full in names:
    name, limit = split_limit(full)
    suffix = "" if limit is None else f"@{limit}"
    namespace, dataset = parse_task(name)
    known = HARNESS_DATASETS if namespace == "harness" else CLOZE_DATASETS
    if namespace == "harness" and dataset == "mmlu":
      out += [f"harness:mmlu_{s}{suffix}" for s in olmo_data.mmlu_subjects()]
    elif namespace == "harness" and dataset.startswith("mmlu_"):
      olmo_data.source(dataset)  # KeyError with the known subjects
      out.append(full)
    elif dataset in known:
      out.append(full)
    else:
      extra = ", mmlu, mmlu_<subject>" if namespace == "harness" else ""
      raise ValueError(f"--tasks {name}: unknown {namespace} task; known: {', '.join(known)}{extra}")
  return list(dict.fromkeys(out))


def is_harness_name(name: str) -> bool:
  return name.split(":", 1)[0] in NAMESPACES and ":" in name


def evaluate_multiple_choice(params, config, tokens: Tokens, dataset: str, pool, docs,
                             cfg: HarnessConfig, convention=None) -> dict:
  shots = fewshot_exemplars(dataset, pool, docs, cfg.num_fewshot, cfg.seed)
  reqs = [q for i, (doc, s) in enumerate(zip(docs, shots)) for q in requests(dataset, i, doc, s)]
  rows = request_rows(tokens, reqs, cfg.mode, convention, config.max_length)
  scores = score_bucketed(params, config, rows, cfg.batch_size)
  lls: list = [[] for _ in docs]
  for req, s in zip(reqs, scores):
    lls[req.doc].append(s.logprob)
  per_doc = []
  for doc, ll in zip(docs, lls):
    r = render(dataset, doc)
    choices = r.texts if multiple_input(dataset) else r.choices
    per_doc.append(choice_metrics(ll, choices, r.gold))
  out = {"kind": "multiple_choice"}
  for key in ("acc", "acc_norm", "acc_bytes"):
    out[key] = metrics_lib.mean([m[key] for m in per_doc])
  out["examples"] = len(docs)
  out["requests"] = len(reqs)
  out["loglikelihoods"] = lls
  if cfg.log_samples:
    out["samples"] = [{"context": q.context, "continuation": q.continuation} for q in reqs[:cfg.log_samples]]
  return out


def evaluate_gsm8k(params, config, tokens: Tokens, pool, docs, cfg: HarnessConfig,
                   convention=None) -> dict:
  from glmjax.generate import decoding  # pylint: disable=import-outside-toplevel
  shots = fewshot_exemplars("gsm8k", pool, docs, cfg.num_fewshot, cfg.seed)
  prompts = [contexts("gsm8k", doc, s)[0] for doc, s in zip(docs, shots)]
  options = decoding.GenerationOptions(max_new_tokens=cfg.max_new_tokens, strategy="greedy",
                                       stop_ids=tokens.eos_ids)
  hits, flexible, samples = [], [], []
  order = sorted(range(len(docs)), key=lambda i: -len(prompts[i]))
  texts: list = [None] * len(docs)
  for start in range(0, len(order), cfg.batch_size):
    chunk = order[start:start + cfg.batch_size]
    ids = [tokens.encode(prompts[i]) for i in chunk]
    room = config.max_length - cfg.max_new_tokens - 1
    ids = [t[max(0, len(t) - room):] for t in ids]
    while len(ids) < cfg.batch_size:  # one shape per bucket of prompts
      ids.append(ids[-1])
    if cfg.mode == "blank":
      from glmjax.generate import glm  # pylint: disable=import-outside-toplevel
      sp = tokens.specials
      part_as = [t + [sp.gmask] for t in ids]
      result = glm.continue_glm(params, config, part_as, [[sp.sop]] * len(part_as),
                                [len(a) - 1 for a in part_as], options,
                                **({} if convention is None else {"convention": convention}))
    else:  # decoding.generate, with the prompt padded to its bucket (one compile per bucket)
      from glmjax.model import decode  # pylint: disable=import-outside-toplevel
      width = bucket_of(max(map(len, ids)), room)
      chunk_rows = decoding.left_pad([decoding.text_prompt(t) for t in ids], options.pad_id, width)
      total = width + options.max_new_tokens
      decoding.check_prompt_ids(chunk_rows, config, total)
      cache = decode.init_cache(config, len(ids), total)
      result, _ = decoding.continue_chunk(params, config, cache, chunk_rows, np.ones(len(ids), bool),
                                          options)
    for i, seq in zip(chunk, result.sequences()):
      texts[i] = tokens.decode(seq)
  for doc, text in zip(docs, texts):
    for stop in GSM8K_UNTIL:  # generate_until's `until`
      text = text.split(stop)[0]
    gold = metrics_lib.extract_gsm8k_answer(doc["answer"])
    strict = metrics_lib.extract_gsm8k_answer(text, flexible=False)
    loose = metrics_lib.extract_gsm8k_answer(text, flexible=True)
    hits.append(strict is not None and strict == gold)
    flexible.append(loose is not None and loose == gold)
    if len(samples) < max(3, cfg.log_samples):
      samples.append({"generated": text, "answer": gold, "extracted": loose})
  return {"kind": "chain_of_thought", "exact_match": metrics_lib.mean(hits),
          "exact_match_flexible": metrics_lib.mean(flexible), "examples": len(docs), "samples": samples}


# --- GLM cloze (the GLM paper's SuperGLUE patterns) -------------------------------------------------

MASK = "[MASK]"


@dataclasses.dataclass(frozen=True)
class ClozeItem:
  pattern: str  # text with one [MASK]
  verbalizers: tuple  # what fills the mask, one per label
  gold: int


def _strip_period(text: str) -> str:
  text = text.strip()
  return text[:-1] if text.endswith(".") else text


def cloze_item(dataset: str, doc: dict) -> ClozeItem:
  d = doc
  if dataset == "boolq":
    return ClozeItem(f"{_strip_period(d['passage'])}. Question: {d['question']}? Answer: {MASK}.",
                     ("No", "Yes"), d["label"])
  if dataset == "copa":
    connector = {"cause": "because", "effect": "so"}[d["question"]]
    c1, c2 = (_copa_choice(_strip_period(d[k])) for k in ("choice1", "choice2"))
    return ClozeItem(f"\"{_strip_period(d['choice1'])}\" or \"{_strip_period(d['choice2'])}\"? "
                     f"{_strip_period(d['premise'])}, {connector} {MASK}.", (c1, c2), d["label"])
  if dataset == "rte":  # glue/rte: label 0 = entailment, 1 = not entailment
    return ClozeItem(f"\"{_strip_period(d['sentence2'])}\"? {MASK}, \"{d['sentence1']}\"",
                     ("Yes", "No"), d["label"])
  if dataset == "cb":  # super_glue/cb: 0 entailment, 1 contradiction, 2 neutral
    return ClozeItem(f"\"{_strip_period(d['hypothesis'])}\"? {MASK}, \"{d['premise']}\"",
                     ("Yes", "No", "Maybe"), d["label"])
  raise KeyError(dataset)


def cloze_tokens(tokens: Tokens, pattern: str) -> tuple[list, list]:
  """(text up to the mask, text from the mask on) as ids; GLM: the mask id in place."""
  before, _, after = pattern.partition(MASK)
  return tokens.encode(before.rstrip()), tokens.encode(after)


def evaluate_cloze(params, config, tokens: Tokens, dataset: str, docs, cfg: HarnessConfig,
                   convention=None) -> dict:
  items = [cloze_item(dataset, d) for d in docs]
  rows, owners = [], []
  for i, item in enumerate(items):
    before, after = cloze_tokens(tokens, item.pattern)
    options = [tokens.encode(" " + v if tokens.kind == "hf" else v) for v in item.verbalizers]
    longest = max(map(len, options))
    if cfg.mode == "blank":  # the passage (before the mask) is cut from the left to fit
      after = after[:max(0, config.max_length // 4)]
      before = _keep_last(before, config.max_length - len(after) - 2 - longest)
      context = before + [tokens.specials.mask_ids[0]] + after
      kwargs = {} if convention is None else {"convention": convention}
      rows += scoring.option_rows(context, options, mode="blank", specials=tokens.specials, **kwargs)
    else:
      before = _keep_last(before, config.max_length + 1 - longest)
      rows += [scoring.append_row(before, o) for o in options]
    owners += [i] * len(options)
  scores = score_bucketed(params, config, rows, cfg.batch_size)
  lls: list = [[] for _ in items]
  for owner, s in zip(owners, scores):
    lls[owner].append(s.logprob)
  per_doc = [choice_metrics(ll, item.verbalizers, item.gold) for ll, item in zip(lls, items)]
  return {"kind": "cloze", "acc": metrics_lib.mean([m["acc"] for m in per_doc]),
          "acc_norm": metrics_lib.mean([m["acc_norm"] for m in per_doc]), "examples": len(items),
          "loglikelihoods": lls}


def cloze_docs(dataset: str) -> list[dict]:
  _, evaluated, _ = split_docs(dataset)
  return evaluated


def evaluate_task(params, config, tokens: Tokens, name: str, cfg: HarnessConfig,
                  convention=None) -> dict:
  namespace, dataset = parse_task(name)
  _, own_limit = split_limit(name)
  limit = cfg.limit if own_limit is None else own_limit
  pool, docs, how = split_docs(dataset)
  if limit:
    docs = docs[:limit]
  if not docs:
    raise ValueError(f"{name}: no documents to evaluate")
  if namespace == "cloze":
    result = evaluate_cloze(params, config, tokens, dataset, docs, cfg, convention)
  elif dataset == "gsm8k":
    result = evaluate_gsm8k(params, config, tokens, pool, docs, cfg, convention)
  else:
    result = evaluate_multiple_choice(params, config, tokens, dataset, pool, docs, cfg, convention)
  result.update(num_fewshot=cfg.num_fewshot if namespace == "harness" else 0,
                cluster=cluster_of(dataset), split=how, pool=len(pool))
  return result


def clusters_table(per_task: dict) -> dict:
  """Per cluster: the mean over its tasks of each of acc / acc_norm / exact_match."""
  grouped: dict = {}
  for name, result in per_task.items():
    grouped.setdefault(result.get("cluster", "other"), []).append(result)
  out = {}
  for cluster, results in grouped.items():
    row = {"tasks": len(results)}
    for key in ("acc", "acc_norm", "exact_match"):
      values = [r[key] for r in results if key in r]
      if values:
        row[key] = metrics_lib.mean(values)
    out[cluster] = row
  return out


def evaluate(params, config, tokens: Tokens, names: Sequence[str], cfg: HarnessConfig,
             convention=None, log=None) -> dict:
  per_task = {}
  for name in names:
    per_task[name] = evaluate_task(params, config, tokens, name, cfg, convention)
    if log is not None:
      r = per_task[name]
      log(f"{name}: " + ", ".join(f"{k} {r[k]:.4f}" for k in ("acc", "acc_norm", "exact_match") if k in r)
          + f" ({r['examples']} examples, {cfg.num_fewshot}-shot)")
  return {"tasks": per_task, "clusters": clusters_table(per_task), "num_fewshot": cfg.num_fewshot,
          "mode": cfg.mode, "limit": cfg.limit}


def format_tables(results: dict) -> str:
  lines = []
  for title, rows in (("task", results["tasks"]), ("cluster", results["clusters"])):
    columns = [c for c in ("acc", "acc_norm", "exact_match") if any(c in r for r in rows.values())]
    width = max([len(n) for n in rows] + [len(title)]) + 2
    lines.append(title.ljust(width) + "".join(c.rjust(12) for c in columns) + "n".rjust(8))
    for name, r in rows.items():
      cells = "".join(("-" if r.get(c) is None else f"{100 * r[c]:.2f}").rjust(12) for c in columns)
      lines.append(name.ljust(width) + cells + str(r.get("examples", r.get("tasks", ""))).rjust(8))
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def without_loglikelihoods(results: dict) -> dict:
  """A copy for printing / small JSON: per-option log-likelihoods dropped."""
  out = dict(results, tasks={k: {kk: vv for kk, vv in v.items() if kk != "loglikelihoods"}
                             for k, v in results["tasks"].items()})
  return out


def hf_tokenizer_folder(workdir_tokenizer: str) -> Optional[str]:
  """The run's tokenizer/ folder when it holds an HF fast tokenizer (imported causal models)."""
  if workdir_tokenizer and os.path.isfile(os.path.join(workdir_tokenizer, "tokenizer.json")):
    return workdir_tokenizer
  return None
