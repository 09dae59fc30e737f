"""GLM blank-infilling objectives as seqio preprocessors (tf.data graph code).

The spec is DESIGN.md section 5 (after the GLM reference implementation,
`blocklm_utils.ConstructBlockStrategy`). From a document of n tokens:

* token level `[MASK]`: span lengths ~ Poisson(3) truncated to 1..39, drawn
  until their sum reaches int(0.15 n) (at least 1); the spans sit at sorted
  random offsets with at least one untouched token between two spans
  (GLM's `sample_spans`: m = n - sum - k + 1 free slots, k sorted offsets in
  [0, m], span j starts at offset_j + sum_{i<j}(len_i + 1)).
* sentence level `[sMASK]`: sentences (ending in . ? ! ; : 。？！；： or a
  newline) taken in random order until they cover >= 15% of the tokens.
* document level `[gMASK]`: one span at the end, its length uniform in
  [ceil(0.5 n), n) (the prefix stays as context).

Every objective produces one flat GLM example, the per-example form of the
batch contract (DESIGN.md section 2), all int32 of one length a + b:

  tokens          Part A (spans replaced by their mask token), then for each
                  span in shuffled order: <sop> span
  targets         0 on Part A, then for each span: span <eop>
  loss_mask       0 on Part A, 1 on Part B
  positions       0..a-1 on Part A; on Part B the Part A index of the span's mask
  block_positions 0 on Part A; 1..len+1 within each span
  bidirectional   1 on Part A, 0 on Part B

Causal LM is the degenerate case with Part A empty (one span = the whole
document, position 0); prefix LM is the document objective.

Preprocessors take seqio's `sequence_length` (key "tokens"): documents are
cut into chunks small enough that each example fits that length, and the
number of spans is capped so that a + b = n + 2k never exceeds it.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from glmjax.tasks import vocab as vocab_lib

FEATURES = ("tokens", "targets", "loss_mask", "positions", "block_positions", "bidirectional")
OBJECTIVES = ("token", "sentence", "document")
GLM_130B_RATES = {"token": 0.3, "document": 0.7}
GLM_10B_RATES = {"token": 0.5, "sentence": 0.3, "document": 0.2}
DEFAULT_RATES = GLM_10B_RATES

MASK_RATIO = 0.15
POISSON_LAMBDA = 3.0
MAX_SPAN_LENGTH = 39
DOCUMENT_RATIO = (0.5, 1.0)
SENTENCE_ENDS = ".?!;:。？！；：\n"
# Expected a + b = n + 2k over n is ~1.1 for token-level masking (k ~ 0.15 n / 3.16);
# chunks of length / 1.15 leave room for the span overhead.
SPAN_OVERHEAD = 1.15


# ------------------------------------------------------------------ helpers


def vocabulary_of(output_features) -> vocab_lib.GLMVocabulary:
  if output_features and "tokens" in output_features:
    return output_features["tokens"].vocabulary
  return vocab_lib.default_vocabulary()


def row_length(sequence_length) -> Optional[int]:
  if not sequence_length:
    return None
  if "tokens" not in sequence_length:
    raise ValueError(f"sequence_length={dict(sequence_length)} has no 'tokens' entry; GLM tasks "
                     "are sized by the packed row length, e.g. {'tokens': 512, ...}")
  return int(sequence_length["tokens"])


def truncated_poisson_logits(poisson_lambda: float = POISSON_LAMBDA,
                             max_span_length: int = MAX_SPAN_LENGTH) -> np.ndarray:
  """log P(len = k), k = 1..max_span_length, of Poisson(lambda) (unnormalised: softmax normalises)."""
  k = np.arange(1, max_span_length + 1, dtype=np.float64)
  return (k * math.log(poisson_lambda) - poisson_lambda
          - np.array([math.lgamma(x + 1) for x in k])).astype(np.float32)


def sentence_end_table(vocabulary: vocab_lib.GLMVocabulary) -> np.ndarray:
  """bool [vocab_size]: the piece contains a sentence end (GLM's `contains_sentence_end`)."""
  key = vocabulary.sentencepiece_model_file
  if key not in _SENTENCE_END_TABLES:
    _SENTENCE_END_TABLES[key] = _build_sentence_end_table(vocabulary)
  return _SENTENCE_END_TABLES[key]


_SENTENCE_END_TABLES: dict[str, np.ndarray] = {}


def _build_sentence_end_table(vocabulary) -> np.ndarray:
  tokenizer = vocabulary.tokenizer
  table = np.zeros(vocabulary.vocab_size, dtype=bool)
  for i in range(tokenizer.get_piece_size()):
    if tokenizer.is_control(i) or tokenizer.is_unknown(i):
      continue
    piece = tokenizer.id_to_piece(i)
    if tokenizer.is_byte(i):
      table[i] = piece == "<0x0A>"
    else:
      table[i] = any(c in piece for c in SENTENCE_ENDS)
  return table


def split_seeds(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _exclusive_cumsum(x):
  return tf.cumsum(x, exclusive=True)


# ------------------------------------------------------------------ span samplers


def token_spans(n, seed, *, max_spans, mask_ratio=MASK_RATIO, poisson_lambda=POISSON_LAMBDA,
                max_span_length=MAX_SPAN_LENGTH):
  """[MASK] spans of a document of n tokens: (starts, lengths), sorted, gaps >= 1.

  At most `max_spans` spans (the caller's length budget); the last span is
  shortened if the draws overshoot what n tokens can hold with the gaps.
  """
  n = tf.cast(n, tf.int32)
  length_seed, place_seed = split_seeds(seed, 2)
  target = tf.maximum(1, tf.cast(tf.floor(mask_ratio * tf.cast(n, tf.float32)), tf.int32))
  logits = tf.constant(truncated_poisson_logits(poisson_lambda, max_span_length))[None, :]
  draws = tf.random.stateless_categorical(logits, target, length_seed, dtype=tf.int32)[0] + 1
  reached = tf.cumsum(draws) >= target
  k = tf.reduce_sum(tf.cast(tf.logical_not(reached), tf.int32)) + 1
  k = tf.minimum(k, tf.maximum(1, tf.cast(max_spans, tf.int32)))
  lengths = draws[:k]
  excess = tf.reduce_sum(lengths) + (k - 1) - n
  lengths = tf.tensor_scatter_nd_sub(lengths, [[k - 1]], [tf.maximum(excess, 0)])
  free = n - tf.reduce_sum(lengths) - (k - 1)
  offsets = tf.sort(tf.random.stateless_uniform([k], place_seed, minval=0, maxval=free + 1, dtype=tf.int32))
  starts = offsets + _exclusive_cumsum(lengths + 1)
  return starts, lengths


def sentence_spans(tokens, seed, *, end_table, max_spans, mask_ratio=MASK_RATIO):
  """[sMASK] spans: whole sentences in random order until >= mask_ratio of the tokens."""
  n = tf.size(tokens)
  is_end = tf.gather(end_table, tokens)
  sentence_id = tf.cumsum(tf.cast(is_end, tf.int32), exclusive=True)
  num_sentences = sentence_id[-1] + 1
  sentence_length = tf.math.unsorted_segment_sum(tf.ones_like(tokens), sentence_id, num_sentences)
  sentence_start = _exclusive_cumsum(sentence_length)
  order = tf.argsort(tf.random.stateless_uniform([num_sentences], seed))
  covered = tf.cumsum(tf.gather(sentence_length, order))
  target = tf.maximum(1, tf.cast(tf.floor(mask_ratio * tf.cast(n, tf.float32)), tf.int32))
  k = tf.reduce_sum(tf.cast(covered < target, tf.int32)) + 1
  k = tf.minimum(tf.minimum(k, num_sentences), tf.maximum(1, tf.cast(max_spans, tf.int32)))
  chosen = tf.sort(order[:k])
  return tf.gather(sentence_start, chosen), tf.gather(sentence_length, chosen)


def document_span(n, seed, *, ratio=DOCUMENT_RATIO):
  """[gMASK] span: the last L tokens, L uniform in [ceil(lo n), ceil(hi n)), at least 1.

  So lo <= L / n < hi, and a prefix of at least one token stays unless n == 1.
  """
  n = tf.cast(n, tf.int32)
  nf = tf.cast(n, tf.float32)
  low = tf.maximum(1, tf.cast(tf.math.ceil(ratio[0] * nf), tf.int32))
  high = tf.maximum(low + 1, tf.cast(tf.math.ceil(ratio[1] * nf), tf.int32))
  length = tf.random.stateless_uniform([], seed, minval=low, maxval=high, dtype=tf.int32)
  length = tf.minimum(length, n)
  return tf.reshape(n - length, [1]), tf.reshape(length, [1])


# ------------------------------------------------------------------ example builders


def build_blank_infilling_example(tokens, starts, lengths, mask_id, seed, *, sop_id, eop_id,
                                  shuffle_spans=True):
  """The flat GLM example for spans (sorted by start) of `tokens`."""
  tokens = tf.cast(tokens, tf.int32)
  n = tf.size(tokens)
  k = tf.size(starts)
  ends = starts + lengths
  boundary = (tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, n + 1)
              - tf.math.unsorted_segment_sum(tf.ones_like(ends), ends, n + 1))
  in_span = tf.cumsum(boundary)[:n] > 0
  is_start = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, n + 1)[:n] > 0
  masked_tokens = tf.tensor_scatter_nd_update(tokens, starts[:, None], tf.fill([k], tf.cast(mask_id, tf.int32)))
  part_a = tf.boolean_mask(masked_tokens, tf.logical_or(tf.logical_not(in_span), is_start))
  mask_positions = starts - _exclusive_cumsum(lengths) + tf.range(k)

  if shuffle_spans:
    order = tf.argsort(tf.random.stateless_uniform([k], seed))
  else:
    order = tf.range(k)
  span_starts = tf.gather(starts, order)
  span_lengths = tf.gather(lengths, order)
  span_tokens = tf.gather(tokens, tf.ragged.range(span_starts, span_starts + span_lengths))
  sop = tf.fill([k, 1], tf.constant(sop_id, tf.int32))
  eop = tf.fill([k, 1], tf.constant(eop_id, tf.int32))
  part_b_tokens = tf.concat([sop, span_tokens], axis=1).flat_values
  part_b_targets = tf.concat([span_tokens, eop], axis=1).flat_values
  part_b_positions = tf.repeat(tf.gather(mask_positions, order), span_lengths + 1)
  part_b_blocks = tf.ragged.range(1, span_lengths + 2).flat_values
  return assemble_example(part_a, part_b_tokens, part_b_targets, part_b_positions, part_b_blocks)


def assemble_example(part_a, b_tokens, b_targets, b_positions, b_blocks):
  a = tf.size(part_a)
  b = tf.size(b_tokens)
  zeros_a, zeros_b = tf.zeros([a], tf.int32), tf.zeros([b], tf.int32)
  return {
      "tokens": tf.concat([part_a, b_tokens], 0),
      "targets": tf.concat([zeros_a, b_targets], 0),
      "loss_mask": tf.concat([zeros_a, tf.ones([b], tf.int32)], 0),
      "positions": tf.concat([tf.range(a), b_positions], 0),
      "block_positions": tf.concat([zeros_a, b_blocks], 0),
      "bidirectional": tf.concat([tf.ones([a], tf.int32), zeros_b], 0),
  }


def build_text_to_text_example(inputs, targets, *, gmask_id, sop_id, eop_id, max_length=None):
  """Part A = inputs + [gMASK] (the prompt), Part B = <sop> targets / targets <eop>.

  With `max_length`, an over-long prompt loses tokens from its left end (the
  question sits at the end of Flan prompts) and an over-long answer its tail.
  """
  inputs = tf.cast(inputs, tf.int32)
  targets = tf.cast(targets, tf.int32)
  if max_length is not None:
    targets = targets[:max(1, max_length - 2)]
    room_for_prompt = tf.maximum(0, max_length - 2 - tf.size(targets))
    inputs = inputs[tf.maximum(0, tf.size(inputs) - room_for_prompt):]
  part_a = tf.concat([inputs, [gmask_id]], 0)
  b = tf.size(targets) + 1
  return assemble_example(part_a, tf.concat([[sop_id], targets], 0), tf.concat([targets, [eop_id]], 0),
                       tf.fill([b], tf.size(part_a) - 1), tf.range(1, b + 1))


def build_causal_example(tokens, *, sop_id, eop_id):
  """Part A empty; Part B = <sop> doc / doc <eop> at position 0, block positions 1..n+1."""
  tokens = tf.cast(tokens, tf.int32)
  b = tf.size(tokens) + 1
  return assemble_example(tf.zeros([0], tf.int32), tf.concat([[sop_id], tokens], 0),
                       tf.concat([tokens, [eop_id]], 0), tf.zeros([b], tf.int32), tf.range(1, b + 1))


# ------------------------------------------------------------------ seqio preprocessors


def chunk_documents(dataset: tf.data.Dataset, max_tokens: Optional[int], key: str = "targets"):
  """One example per chunk of at most `max_tokens` ids of `key`; empty documents dropped."""
  if key not in dataset.element_spec:
    raise ValueError(f"blank infilling reads the token ids of feature {key!r}, which the dataset "
                     f"lacks (features: {sorted(dataset.element_spec)}); tokenize text into it first")
  ds = dataset.map(lambda ex: tf.cast(ex[key], tf.int32), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.filter(lambda t: tf.size(t) > 0)
  if max_tokens is None:
    return ds
  if max_tokens < 1:
    raise ValueError(f"sequence_length['tokens'] leaves max_tokens={max_tokens} per document; "
                     "use a longer sequence length")

  def chunks(t):
    count = (tf.size(t) + max_tokens - 1) // max_tokens
    return tf.data.Dataset.range(tf.cast(count, tf.int64)).map(
        lambda i: t[tf.cast(i, tf.int32) * max_tokens:(tf.cast(i, tf.int32) + 1) * max_tokens])

  return ds.flat_map(chunks)


def _resolve_rates(objective, rates) -> dict[str, float]:
  if objective is not None:
    if objective not in OBJECTIVES:
      raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    if rates is not None:
      raise ValueError("pass either objective= (one objective) or rates= (a mix), not both")
    return {objective: 1.0}
  rates = dict(DEFAULT_RATES if rates is None else rates)
  unknown = set(rates) - set(OBJECTIVES)
  if unknown:
    raise ValueError(f"rates has unknown objectives {sorted(unknown)}; use keys from {OBJECTIVES}")
  if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
    raise ValueError(f"rates={rates} must be non-negative with a positive sum")
  return {k: float(v) for k, v in rates.items() if v > 0}


def max_document_tokens(max_length: Optional[int], objectives) -> Optional[int]:
  """Longest document chunk whose example fits `max_length` (see SPAN_OVERHEAD)."""
  if max_length is None:
    return None
  if set(objectives) <= {"document"}:
    return max_length - 2
  return int(max_length / SPAN_OVERHEAD)


def blank_infilling(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]] = None,
                    output_features: Optional[Mapping[str, seqio.Feature]] = None,
                    *,
                    objective: Optional[str] = None,
                    rates: Optional[Mapping[str, float]] = None,
                    mask_ratio: float = MASK_RATIO,
                    poisson_lambda: float = POISSON_LAMBDA,
                    max_span_length: int = MAX_SPAN_LENGTH,
                    document_ratio: tuple[float, float] = DOCUMENT_RATIO,
                    shuffle_spans: bool = True,
                    input_key: str = "targets") -> tf.data.Dataset:
  """GLM blank infilling: token ids in `input_key` -> flat GLM examples.

  `objective` picks one of "token" | "sentence" | "document"; otherwise each
  example draws its objective with `rates` (default GLM-10B: 0.5 token, 0.3
  sentence, 0.2 document; `GLM_130B_RATES` is 0.3 token / 0.7 document).
  Deterministic from seqio's preprocessor seed.
  """
  rates = _resolve_rates(objective, rates)
  if not 0 < mask_ratio < 0.5:
    raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 0.5)")
  if not 0 <= document_ratio[0] < document_ratio[1] <= 1:
    raise ValueError(f"document_ratio={document_ratio} must satisfy 0 <= low < high <= 1")
  vocabulary = vocabulary_of(output_features)
  ids = vocab_lib.special_ids(vocabulary)
  max_length = row_length(sequence_length)
  end_table = tf.constant(sentence_end_table(vocabulary)) if "sentence" in rates else None
  names = list(rates)
  log_rates = tf.math.log(tf.constant([[rates[k] for k in names]], tf.float32))
  mask_ids = {"token": ids.mask, "sentence": ids.smask, "document": ids.gmask}

  def spans_for(name, tokens, seed, max_spans):
    n = tf.size(tokens)
    if name == "token":
      starts, lengths = token_spans(n, seed, max_spans=max_spans, mask_ratio=mask_ratio,
                                    poisson_lambda=poisson_lambda, max_span_length=max_span_length)
    elif name == "sentence":
      starts, lengths = sentence_spans(tokens, seed, end_table=end_table, max_spans=max_spans,
                                       mask_ratio=mask_ratio)
    else:
      starts, lengths = document_span(n, seed, ratio=document_ratio)
    return starts, lengths, tf.constant(mask_ids[name], tf.int32)

  @seqio.map_over_dataset(num_seeds=1)
  def make_example(tokens, seed):
    choice_seed, span_seed, shuffle_seed = split_seeds(seed, 3)
    n = tf.size(tokens)
    max_spans = n if max_length is None else (max_length - n) // 2
    if len(names) == 1:
      starts, lengths, mask_id = spans_for(names[0], tokens, span_seed, max_spans)
    else:
      branch = tf.random.stateless_categorical(log_rates, 1, choice_seed, dtype=tf.int32)[0, 0]
      starts, lengths, mask_id = tf.switch_case(
          branch, [functools.partial(spans_for, name, tokens, span_seed, max_spans) for name in names])
    return build_blank_infilling_example(tokens, starts, lengths, mask_id, shuffle_seed, sop_id=ids.sop,
                                         eop_id=ids.eop, shuffle_spans=shuffle_spans)

  chunked = chunk_documents(dataset, max_document_tokens(max_length, names), key=input_key)
  return make_example(chunked)


def prefix_lm(dataset, sequence_length=None, output_features=None, *,
              ratio: tuple[float, float] = DOCUMENT_RATIO, input_key: str = "targets"):
  """Prefix LM: the document objective (`[gMASK]` after a bidirectional prefix)."""
  return blank_infilling(dataset, sequence_length, output_features, objective="document",
                         document_ratio=ratio, input_key=input_key)


def causal_lm(dataset, sequence_length=None, output_features=None, *, input_key: str = "targets"):
  """Causal LM: Part A empty, the whole chunk is one Part B span (<sop> doc -> doc <eop>)."""
  ids = vocab_lib.special_ids(vocabulary_of(output_features))
  max_length = row_length(sequence_length)
  chunked = chunk_documents(dataset, None if max_length is None else max_length - 1, key=input_key)
  return chunked.map(lambda t: build_causal_example(t, sop_id=ids.sop, eop_id=ids.eop),
                     num_parallel_calls=tf.data.AUTOTUNE)
