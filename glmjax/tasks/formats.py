"""Instruction formats as seqio preprocessors: Flan (4 formats), Alpaca, ChatGLM3 chat.

Every preprocessor ends in the flat GLM example of glmjax.tasks.objectives:
the prompt is Part A (+ [gMASK]), the answer Part B (<sop> answer <eop>), so
instruction tasks mix freely with pretraining tasks. The converter option
`prompt_layout="causal"` makes the prompt causal for LLaMA-style models.

Flan formats (Chung et al. 2022), over QA records {id, question, options,
answer, rationale}:
  zero_shot     template(question, options) -> answer
  few_shot      k exemplars (question + answer) from the task's own train
                split, never the record being asked, then the question
  cot           question + "Let's think step by step." -> rationale +
                " The answer is X."
  few_shot_cot  k exemplars with their rationales, then the CoT question
Each format has several templates; one is drawn per example (seeded), and
the exemplars use the same template as the question. Templates may also use
the record's other scalar string fields (e.g. {premise}, {hypothesis}). Options (multiple
choice, one per line in `options`) are rendered as "OPTIONS:\n- a\n- b".
Also kept per example for evaluation: inputs_pretokenized,
targets_pretokenized and answer (strings).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from glmjax.tasks import objectives
from glmjax.tasks import vocab as vocab_lib

FLAN_FORMATS = ("zero_shot", "few_shot", "cot", "few_shot_cot")
QA_FIELDS = ("id", "question", "options", "answer", "rationale")

# (prompt template, target template); fields: {question} {options} {answer} {rationale}.
ZERO_SHOT_TEMPLATES = (
    ("{question}{options}", "{answer}"),
    ("Question: {question}{options}\nAnswer:", "{answer}"),
    ("Answer the following question.\n{question}{options}", "{answer}"),
    ("Q: {question}{options}\nA:", "{answer}"),
)
COT_TEMPLATES = (
    ("{question}{options}\nLet's think step by step.", "{rationale} The answer is {answer}."),
    ("Q: {question}{options}\nA: Let's think step by step.", "{rationale} The answer is {answer}."),
    ("Answer the following question by reasoning step by step.\n{question}{options}",
     "{rationale} The answer is {answer}."),
)
DEFAULT_TEMPLATES = {"zero_shot": ZERO_SHOT_TEMPLATES, "few_shot": ZERO_SHOT_TEMPLATES,
                     "cot": COT_TEMPLATES, "few_shot_cot": COT_TEMPLATES}
EXEMPLAR_SEPARATOR = "\n\n"
_FIELD = re.compile(r"\{(\w+)\}")


TEMPLATE_FIELDS = ("question", "options", "answer", "rationale")


def _parse_template(template: str, fields: Sequence[str] = TEMPLATE_FIELDS) -> list[tuple[bool, str]]:
  """'Q: {question}' -> [(False, 'Q: '), (True, 'question')]; `fields`: the names it may use."""
  parts, last = [], 0
  for match in _FIELD.finditer(template):
    if match.group(1) not in fields:
      raise ValueError(f"template {template!r} uses unknown field {{{match.group(1)}}}; "
                       f"fields are {' '.join('{' + f + '}' for f in fields)}")
    parts.append((False, template[last:match.start()]))
    parts.append((True, match.group(1)))
    last = match.end()
  parts.append((False, template[last:]))
  return [p for p in parts if p[0] or p[1]]


def render(template: str, fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """Fills a template with string tensors (scalars or same-shape vectors)."""
  pieces = [fields[name] if is_field else name for is_field, name in _parse_template(template, tuple(fields))]
  like = next(iter(fields.values()))
  pieces = [tf.fill(tf.shape(like), p) if isinstance(p, str) else p for p in pieces]
  return tf.strings.join(pieces) if pieces else tf.fill(tf.shape(like), "")


def render_options(options: tf.Tensor) -> tf.Tensor:
  """'a\\nb' -> '\\nOPTIONS:\\n- a\\n- b'; '' stays ''."""
  listed = tf.strings.join(["\nOPTIONS:\n- ", tf.strings.regex_replace(options, "\n", "\n- ")])
  return tf.where(tf.strings.length(options) > 0, listed, tf.fill(tf.shape(options), ""))


def render_text(template: str, record: Mapping[str, object]) -> str:
  """`render` in plain Python, for one record of strings ({options} -> the OPTIONS list)."""
  def value(name):
    if name == "options":
      options = str(record["options"])
      return "\nOPTIONS:\n- " + options.replace("\n", "\n- ") if options else ""
    return str(record[name])
  return "".join(value(name) if is_field else name for is_field, name in _parse_template(template, tuple(record)))


def _fields(record: Mapping[str, tf.Tensor], extra: Sequence[str] = ()) -> dict[str, tf.Tensor]:
  return {"question": record["question"], "options": render_options(record["options"]),
          "answer": record["answer"], "rationale": record["rationale"], **{k: record[k] for k in extra}}


def extra_fields(element_spec: Mapping[str, tf.TensorSpec]) -> tuple[str, ...]:
  """The record's scalar string fields beyond QA_FIELDS, which templates may also use."""
  return tuple(sorted(k for k, spec in element_spec.items()
                      if k not in QA_FIELDS and isinstance(spec, tf.TensorSpec)
                      and spec.dtype == tf.string and spec.shape.rank == 0))


def _choose(rendered: Sequence[tf.Tensor], index: tf.Tensor) -> tf.Tensor:
  return tf.gather(tf.stack(rendered), index)


def sample_exemplars(pool_ids: tf.Tensor, exclude_id: tf.Tensor, k: int, seed: tf.Tensor) -> tf.Tensor:
  """k distinct pool indices, uniformly at random, none whose id equals exclude_id."""
  scores = tf.random.stateless_uniform(tf.shape(pool_ids), seed)
  scores = tf.where(tf.equal(pool_ids, tf.cast(exclude_id, pool_ids.dtype)), 2.0, scores)
  return tf.argsort(scores)[:k]


def _encode(vocabulary, text):
  return tf.cast(vocabulary.encode_tf(text), tf.int32)


def _text_to_text(vocabulary, prompt, answer, max_length):
  ids = vocab_lib.special_ids(vocabulary)
  return objectives.build_text_to_text_example(_encode(vocabulary, prompt), _encode(vocabulary, answer),
                                               gmask_id=ids.gmask, sop_id=ids.sop, eop_id=ids.eop,
                                               max_length=max_length)


def flan(dataset: tf.data.Dataset,
         sequence_length: Optional[Mapping[str, int]] = None,
         output_features: Optional[Mapping[str, seqio.Feature]] = None,
         *,
         format: str = "zero_shot",  # pylint: disable=redefined-builtin
         exemplars: Optional[Callable[[], Sequence[Mapping]]] = None,
         num_exemplars: int = 3,
         answer_separator: str = " ",
         encode: Optional[Callable] = None,
         templates: Optional[Sequence[tuple[str, str]]] = None) -> tf.data.Dataset:
  """Flan-format QA records -> flat GLM examples (see module docstring).

  `exemplars` returns the few-shot pool (the task's train records); it is
  called once, when the dataset is built. `answer_separator` joins an
  exemplar's prompt and answer ("\n" suits prompts that end in an option list).
  `encode(vocabulary, prompt, target, max_length)` builds the flat example from
  the two strings (default: Part A prompt + [gMASK], Part B <sop> target <eop>;
  glmjax.tasks.flan.chatml wraps them in a chat template instead).
  """
  if format not in FLAN_FORMATS:
    raise ValueError(f"format={format!r} is not one of {FLAN_FORMATS}")
  templates = tuple(templates or DEFAULT_TEMPLATES[format])
  missing = [f for f in QA_FIELDS if f not in dataset.element_spec]
  if missing:
    raise ValueError(f"flan format needs record fields {QA_FIELDS}; the dataset lacks {missing}")
  extra = extra_fields(dataset.element_spec)
  for prompt_t, target_t in templates:
    _parse_template(prompt_t, TEMPLATE_FIELDS + extra), _parse_template(target_t, TEMPLATE_FIELDS + extra)
  few_shot = format.startswith("few_shot")
  if few_shot:
    if exemplars is None:
      raise ValueError(f"format={format!r} needs exemplars= (a callable returning the train records)")
    if num_exemplars < 1:
      raise ValueError(f"num_exemplars={num_exemplars} must be >= 1 for format={format!r}")
    pool_records = list(exemplars())
    if len(pool_records) <= num_exemplars:
      raise ValueError(f"the exemplar pool has {len(pool_records)} records; few-shot with "
                       f"num_exemplars={num_exemplars} needs more")
    pool = {f: tf.constant([str(r[f]) for r in pool_records]) for f in QA_FIELDS[1:] + extra}
    pool["id"] = tf.constant([int(r["id"]) for r in pool_records], tf.int64)
  vocabulary = objectives.vocabulary_of(output_features)
  max_length = objectives.row_length(sequence_length)

  @seqio.map_over_dataset(num_seeds=1)
  def make_example(record, seed):
    template_seed, exemplar_seed = objectives.split_seeds(seed, 2)
    choice = tf.random.stateless_uniform([], template_seed, 0, len(templates), dtype=tf.int32)
    fields = _fields(record, extra)
    prompt = _choose([render(p, fields) for p, _ in templates], choice)
    target = _choose([render(t, fields) for _, t in templates], choice)
    if few_shot:
      picked = sample_exemplars(pool["id"], record["id"], num_exemplars, exemplar_seed)
      shots = _fields({k: tf.gather(v, picked) for k, v in pool.items()}, extra)
      joint = tf.fill([num_exemplars], answer_separator)
      shot_texts = [tf.strings.join([render(p, shots), joint, render(t, shots)]) for p, t in templates]
      block = tf.strings.reduce_join(_choose(shot_texts, choice), separator=EXEMPLAR_SEPARATOR)
      prompt = tf.strings.join([block, EXEMPLAR_SEPARATOR, prompt])
    example = (encode or _text_to_text)(vocabulary, prompt, target, max_length)
    example.update(inputs_pretokenized=prompt, targets_pretokenized=target, answer=record["answer"])
    return example

  return make_example(dataset)


def instruction(dataset: tf.data.Dataset,
                sequence_length: Optional[Mapping[str, int]] = None,
                output_features: Optional[Mapping[str, seqio.Feature]] = None) -> tf.data.Dataset:
  """Alpaca records {instruction, input, output} -> prompt "instruction\\n\\ninput" -> output."""
  missing = [f for f in ("instruction", "input", "output") if f not in dataset.element_spec]
  if missing:
    raise ValueError(f"instruction format needs fields instruction/input/output; the dataset lacks {missing}")
  vocabulary = objectives.vocabulary_of(output_features)
  max_length = objectives.row_length(sequence_length)

  def make_example(record):
    with_input = tf.strings.join([record["instruction"], "\n\n", record["input"]])
    prompt = tf.where(tf.strings.length(record["input"]) > 0, with_input, record["instruction"])
    example = _text_to_text(vocabulary, prompt, record["output"], max_length)
    example.update(inputs_pretokenized=prompt, targets_pretokenized=record["output"])
    return example

  return dataset.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)


CHAT_ROLES = ("system", "user", "assistant", "observation")


def chat(dataset: tf.data.Dataset,
         sequence_length: Optional[Mapping[str, int]] = None,
         output_features: Optional[Mapping[str, seqio.Feature]] = None) -> tf.data.Dataset:
  """ChatGLM3 conversations {roles: [...], contents: [...]} -> one flat GLM example.

  Part A is [gMASK]; Part B is <sop> then, per turn, `<|role|>` "\\n" content,
  then <eop>; loss only where the target is an assistant content token or the
  token that ends an assistant turn (the next role token or <eop>), so the
  model learns to answer and to stop. At inference, prompt with
  "... <|assistant|>\\n" and stop at <|user|>, <|observation|> or <eop>.
  Over-long conversations are cut by the converter (and counted there).
  """
  missing = [f for f in ("roles", "contents") if f not in dataset.element_spec]
  if missing:
    raise ValueError(f"chat format needs fields roles/contents (lists of equal length); lacks {missing}")
  del sequence_length
  vocabulary = objectives.vocabulary_of(output_features)
  ids = vocab_lib.special_ids(vocabulary)
  role_ids = tf.constant([ids.role(r) for r in CHAT_ROLES], tf.int32)

  def make_example(record):
    roles, contents = record["roles"], record["contents"]
    matches = tf.equal(roles[:, None], tf.constant(CHAT_ROLES)[None, :])
    known = tf.debugging.assert_equal(
        tf.reduce_all(tf.reduce_any(matches, axis=1)), True,
        message=f"chat record has a role outside {CHAT_ROLES}")
    count = tf.debugging.assert_equal(tf.size(roles), tf.size(contents),
                                      message="chat record: roles and contents differ in length")
    with tf.control_dependencies([known, count]):
      role_index = tf.argmax(tf.cast(matches, tf.int32), axis=1, output_type=tf.int32)
    turns = tf.size(roles)
    content_ids = tf.cast(vocabulary.tf_tokenizer.tokenize(contents), tf.int32)
    header = tf.stack([tf.gather(role_ids, role_index), tf.fill([turns], ids.newline)], axis=1)
    turn_tokens = tf.concat([tf.RaggedTensor.from_tensor(header), content_ids], axis=1)
    is_assistant = tf.equal(roles, "assistant")
    content_flags = tf.concat([tf.RaggedTensor.from_tensor(tf.zeros([turns, 2], tf.bool)),
                               tf.ones_like(content_ids, tf.bool) & is_assistant[:, None]], axis=1)
    stream = tf.concat([[ids.sop], turn_tokens.flat_values, [ids.eop]], 0)
    assistant = tf.concat([[False], content_flags.flat_values, [False]], 0)
    loss = tf.logical_or(assistant[1:], tf.logical_and(assistant[:-1], tf.logical_not(assistant[1:])))
    b = tf.size(stream) - 1
    example = objectives.assemble_example(
        tf.constant([ids.gmask], tf.int32), stream[:-1], stream[1:], tf.zeros([b], tf.int32), tf.range(1, b + 1))
    example["loss_mask"] = tf.concat([[0], tf.cast(loss, tf.int32)], 0)
    return example

  return dataset.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
