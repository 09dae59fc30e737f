"""Registers glmjax's tasks and mixtures, and helpers to register your own.

Registered on `import glmjax.tasks` (splits: train, validation):

  glmjax_corpus_en_blank_infilling   Shakespeare, GLM-10B objective mix
  glmjax_corpus_zh_blank_infilling   Tang/Song poems, GLM-10B objective mix
  glmjax_blank_infilling_default     mixture of the two (~10% of tokens Chinese)
  glmjax_corpus_{en,zh}_blank_infilling_glm130b, glmjax_blank_infilling_glm130b
                                     the same with GLM-130B rates (30% [MASK], 70% [gMASK])
  glmjax_corpus_{en,zh}_causal_lm, glmjax_causal_lm (mixture)
  glmjax_flan_arith_{zero_shot,few_shot,cot,few_shot_cot}
                                     synthetic arithmetic word problems (CoT rationales)
  glmjax_flan_poem_author_{zero_shot,few_shot}
                                     who wrote this Tang/Song poem (4 options)
  glmjax_flan_play_{zero_shot,few_shot}
                                     which Shakespeare play is this passage from (4 options)
  glmjax_flan                        mixture of the eight Flan tasks (four formats)
  glmjax_chat_arith                  ChatGLM3 multi-turn chats with an observation turn
  glmjax_flan_real_*                 Flan over real datasets (ARC, BoolQ, ..., MMLU; glmjax.tasks.flan)
"""

from __future__ import annotations

import functools
import importlib
import random
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from glmjax.tasks import corpus, formats, objectives, sources, synthetic
from glmjax.tasks import vocab as vocab_lib

SPLITS = ("train", "validation")
# Sources already serve records in a fully shuffled order (a shuffled index);
# the task-level buffer only interleaves chunks of one document with others.
CORPUS_SHUFFLE_BUFFER = 128
RECORD_SHUFFLE_BUFFER = 32
_QA_ID_BASE = {"train": 0, "validation": 1_000_000}


def import_task_modules(modules: Sequence[str] = ()) -> None:
  """Imports the user's task modules (DataConfig.modules), which register their seqio tasks.

  glmjax's own tasks are registered already: importing this module imported
  glmjax.tasks.
  """
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f"DataConfig.modules: cannot import {name!r} ({e}); "
                       "give an importable module that registers your seqio tasks") from e


def output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> dict[str, seqio.Feature]:
  """The task features of every glmjax task (the flat GLM example)."""
  vocabulary = vocabulary or vocab_lib.default_vocabulary()
  ints = seqio.PassThroughVocabulary(size=0)
  features = {k: seqio.Feature(ints, add_eos=False, dtype=tf.int32) for k in objectives.FEATURES}
  features["tokens"] = seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
  features["targets"] = seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
  return features


def text_preprocessors(objective_fn: Callable, text_key: str = "text") -> list:
  """text field -> token ids in "targets" -> `objective_fn` (a seqio preprocessor)."""
  return [functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          objective_fn]


def register_text_task(name: str, source: seqio.DataSource, *, objective: Optional[str] = None,
                       rates: Optional[Mapping[str, float]] = None, causal: bool = False,
                       text_key: str = "text", vocabulary: Optional[seqio.Vocabulary] = None,
                       shuffle_buffer_size: int = CORPUS_SHUFFLE_BUFFER, **options) -> seqio.Task:
  """A pretraining task over documents in `text_key`: blank infilling, or causal LM if `causal`.

  `options` go to objectives.blank_infilling, e.g. `**objectives.GLM_10B_OPTIONS` (GLM-10B's
  released data options; needs a vocabulary with [CLS] / [dBLOCK])."""
  if causal and (objective or rates or options):
    raise ValueError("causal=True takes no objective/rates/blank-infilling options")
  objective_fn = (objectives.causal_lm if causal else
                  functools.partial(objectives.blank_infilling, objective=objective, rates=rates, **options))
  return seqio.TaskRegistry.add(name, source=source, preprocessors=text_preprocessors(objective_fn, text_key),
                                output_features=output_features(vocabulary),
                                shuffle_buffer_size=shuffle_buffer_size)


def register_flan_task(name: str, load_split: Callable[[str], Sequence[Mapping]], *, format: str,  # pylint: disable=redefined-builtin
                       splits: Sequence[str] = SPLITS, num_exemplars: int = 3,
                       templates=None, vocabulary=None) -> seqio.Task:
  """A Flan-format task over QA records {id, question, options, answer, rationale}.

  Few-shot exemplars come from `load_split("train")`, excluding the asked id.
  """
  prep = functools.partial(formats.flan, format=format, num_exemplars=num_exemplars, templates=templates,
                           exemplars=functools.partial(load_split, "train"))
  return seqio.TaskRegistry.add(name, source=sources.records_source(load_split, splits, formats.QA_FIELDS),
                                preprocessors=[prep], output_features=output_features(vocabulary),
                                shuffle_buffer_size=RECORD_SHUFFLE_BUFFER)


def register_instruction_task(name: str, split_to_jsonl: Mapping[str, str | Sequence[str]],
                              vocabulary=None) -> seqio.Task:
  """Alpaca-style JSONL {instruction, input, output} per split."""
  return seqio.TaskRegistry.add(
      name, source=sources.jsonl_source(split_to_jsonl, ["instruction", "input", "output"]),
      preprocessors=[formats.instruction], output_features=output_features(vocabulary),
      shuffle_buffer_size=RECORD_SHUFFLE_BUFFER)


def register_chat_task(name: str, source: seqio.DataSource, vocabulary=None) -> seqio.Task:
  """Chat records {roles: [...], contents: [...]} (ChatGLM3 roles) from any source."""
  return seqio.TaskRegistry.add(name, source=source, preprocessors=[formats.chat],
                                output_features=output_features(vocabulary),
                                shuffle_buffer_size=RECORD_SHUFFLE_BUFFER)


def chat_jsonl_records(patterns) -> list[dict]:
  """JSONL chats {"conversations": [{"role": ..., "content": ...}, ...]} -> {roles, contents}."""
  records = []
  for number, record in enumerate(sources.read_jsonl(patterns)):
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
      raise ValueError(f"chat record {number} needs a non-empty 'conversations' list")
    for turn in turns:
      if turn.get("role") not in formats.CHAT_ROLES:
        raise ValueError(f"chat record {number}: role {turn.get('role')!r} is not one of {formats.CHAT_ROLES}")
    records.append({"roles": [t["role"] for t in turns], "contents": [str(t.get("content", "")) for t in turns]})
  return records


def chat_jsonl_source(split_to_patterns: Mapping[str, str | Sequence[str]]) -> seqio.DataSource:
  return sources.records_source(lambda split: chat_jsonl_records(split_to_patterns[split]),
                                list(split_to_patterns), ["roles", "contents"])


# ------------------------------------------------------------------ corpus-derived QA (real text)


def _distinct_options(rng: random.Random, answer: str, population: Sequence[str]) -> str:
  others = sorted(set(population) - {answer})
  choices = [answer, *rng.sample(others, 3)]
  rng.shuffle(choices)
  return "\n".join(choices)


@functools.lru_cache(maxsize=None)
def poem_author_records(split: str) -> list[dict]:
  poems = corpus.load("poems_zh", split)
  authors = [p["author"] for p in corpus.load("poems_zh", "train")]
  records = []
  for i, poem in enumerate(poems):
    body = "\n".join(l for l in poem["text"].splitlines() if not l.startswith("作者"))
    rng = random.Random(f"poem_author/{split}/{i}")
    records.append({"id": _QA_ID_BASE[split] + i, "question": f"Who wrote this poem?\n{body}",
                    "options": _distinct_options(rng, poem["author"], authors), "answer": poem["author"],
                    "rationale": ""})
  return records


@functools.lru_cache(maxsize=None)
def play_records(split: str, passage_chars: int = 300) -> list[dict]:
  scenes = corpus.load("shakespeare", split)
  plays = sorted({s["play"] for s in corpus.load("shakespeare", "train")})
  records = []
  for i, scene in enumerate(scenes):
    body = scene["text"].split("\n\n", 1)[-1]
    passage = body[:passage_chars].rsplit("\n", 1)[0]
    rng = random.Random(f"play/{split}/{i}")
    records.append({"id": _QA_ID_BASE[split] + i,
                    "question": f"Which Shakespeare play is this passage from?\n{passage}",
                    "options": _distinct_options(rng, scene["play"], plays), "answer": scene["play"],
                    "rationale": ""})
  return records


@functools.lru_cache(maxsize=None)
def arith_records(split: str) -> list[dict]:
  return synthetic.problems(split)


def chat_arith_records(split: str) -> list[dict]:
  return [synthetic.chat_conversation(r) for r in arith_records(split)]


# ------------------------------------------------------------------ the registered set


def _corpus_source(name: str) -> seqio.DataSource:
  return sources.records_source(functools.partial(corpus.load, name), SPLITS, ["text"])


# Rates per example; Chinese examples (poems, ~55 tokens) are ~8x shorter than
# English ones (scene chunks), so 0.45 of the examples is ~10% of the tokens.
CORPUS_MIXTURE_RATES = {"en": 0.55, "zh": 0.45}
_CORPUS = {"en": "shakespeare", "zh": "poems_zh"}


def register_all() -> None:
  """Registers the tasks and mixtures listed in the module docstring (idempotent)."""
  if "glmjax_blank_infilling_default" in seqio.MixtureRegistry.names():
    return
  for suffix, rates in (("", objectives.GLM_10B_RATES), ("_glm130b", objectives.GLM_130B_RATES)):
    for lang, source_name in _CORPUS.items():
      register_text_task(f"glmjax_corpus_{lang}_blank_infilling{suffix}", _corpus_source(source_name),
                         rates=rates)
    mixture = "glmjax_blank_infilling_default" if not suffix else f"glmjax_blank_infilling{suffix}"
    seqio.MixtureRegistry.add(mixture, [(f"glmjax_corpus_{lang}_blank_infilling{suffix}", rate)
                                        for lang, rate in CORPUS_MIXTURE_RATES.items()])
  for lang, source_name in _CORPUS.items():
    register_text_task(f"glmjax_corpus_{lang}_causal_lm", _corpus_source(source_name), causal=True)
  seqio.MixtureRegistry.add("glmjax_causal_lm", [(f"glmjax_corpus_{lang}_causal_lm", rate)
                                                 for lang, rate in CORPUS_MIXTURE_RATES.items()])

  flan_tasks = []
  for data, load, flan_formats in (("arith", arith_records, formats.FLAN_FORMATS),
                                   ("poem_author", poem_author_records, ("zero_shot", "few_shot")),
                                   ("play", play_records, ("zero_shot", "few_shot"))):
    for fmt in flan_formats:
      flan_tasks.append(register_flan_task(f"glmjax_flan_{data}_{fmt}", load, format=fmt).name)
  seqio.MixtureRegistry.add("glmjax_flan", [(name, 1.0) for name in flan_tasks])
  register_chat_task("glmjax_chat_arith", sources.records_source(chat_arith_records, SPLITS, ["roles", "contents"]))
  from glmjax.tasks import flan as flan_real  # pylint: disable=import-outside-toplevel
  flan_real.register()  # real datasets (glmjax.tasks.flan): registers names only, reads no data
