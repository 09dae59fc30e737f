"""GLM blank-infilling objectives as seqio preprocessors (tf.data graph code).

The spec is GLM's released code, THUDM/GLM `blocklm_utils.py` (commit
4f61ed7), `ConstructBlockStrategy`; where DESIGN.md section 5 differs, the code
wins. From a document of n tokens:

* token level `[MASK]` (`construct_blocks`, lines 336-341): span lengths ~
  Poisson(3) truncated to 1..39, drawn until their sum reaches int(0.15 n) (at
  least 1 here), then shuffled (`generate_blank_data` / `sample_span_in_document`,
  lines 117 and 271) and placed at sorted random offsets with at least one
  untouched token between two spans (`sample_spans`, lines 103-114: m = n - sum
  - k + 1 free slots, k sorted offsets in [0, m], span j starts at offset_j +
  sum_{i<j}(len_i + 1)).
* sentence level `[sMASK]` (lines 363-387): sentences (ending in a token that
  `contains_sentence_end`, lines 76-89: . ? ! ; : or a newline) taken in random
  order until they cover >= int(0.15 n) tokens.
* document level `[gMASK]` (the 'gpt' branch, lines 403-440): a length L =
  randint(int(min_ratio * n), n - 2) (`gpt_min_ratio`: 0.5 by default and in the
  paper, 0.25 in the released `config/ds_block_10B.sh`); then, when the sample
  holds several documents (an eos before its end) or with probability
  `gpt_infill_prob` (0.5), the last L tokens are the suffix to generate
  (Part A = prefix + [gMASK], Part B = <sop> suffix[:-1] -> suffix: no <eop>,
  lines 410-432); otherwise one span of L tokens at a random offset, never the
  last token (`generate_blank_data` -> `sample_span_in_document`, line 129 drops
  the last token from the room), with <eop> like every block (`make_block_data`).

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

The reference draws per batch of samples (one document-span length for the
batch, from its shortest and longest sample); here every example is its own
sample. Guards the reference never needs (its samples are full-length rows):
at least one [MASK] token, L clipped to [1, n], and a chunk too short for a
span at a random offset takes the suffix variant.

GLM-10B's released data options (`config/ds_block_10B.sh`: --bert-prob 0.5
--gap-sentence-prob 0.3 --gpt-min-ratio 0.25 --block-mask-prob 0.1
--short-seq-prob 0.02, [CLS] first) are `GLM_10B_OPTIONS`.
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
DOCUMENT_MIN_RATIO = 0.5  # GLM arguments.py --gpt-min-ratio default (paper: 0.5)
GPT_INFILL_PROB = 0.5  # GLM arguments.py --gpt-infill-prob default
# GLM blocklm_utils.py `contains_sentence_end` (lines 76-89): exactly these characters.
SENTENCE_ENDS = ".?!;:\n"
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

  At most `max_spans` spans (the caller's length budget); the last span (in the
  shuffled order) is shortened if the draws overshoot what n tokens can hold with
  the gaps (the reference drops such a sample, `generate_blank_data` line 275).
  """
  n = tf.cast(n, tf.int32)
  length_seed, place_seed, shuffle_seed = split_seeds(seed, 3)
  target = tf.maximum(1, tf.cast(tf.floor(mask_ratio * tf.cast(n, tf.float32)), tf.int32))
  logits = tf.constant(truncated_poisson_logits(poisson_lambda, max_span_length))[None, :]
  draws = tf.random.stateless_categorical(logits, target, length_seed, dtype=tf.int32)[0] + 1
  reached = tf.cumsum(draws) >= target
  k = tf.reduce_sum(tf.cast(tf.logical_not(reached), tf.int32)) + 1
  k = tf.minimum(k, tf.maximum(1, tf.cast(max_spans, tf.int32)))
  # The draws are shuffled before placement (blocklm_utils.py lines 117 / 271): the draw that
  # crosses the target is longer on average and would otherwise always be the rightmost span.
  lengths = tf.gather(draws[:k], tf.argsort(tf.random.stateless_uniform([k], shuffle_seed)))
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


def document_length(n, seed, *, min_ratio=DOCUMENT_MIN_RATIO):
  """[gMASK] span length: randint(int(min_ratio * n), n - 2) inclusive (blocklm_utils.py
  line 403), clipped to [1, n] for chunks too short for that range."""
  n = tf.cast(n, tf.int32)
  high = tf.maximum(n - 2, 1)
  low = tf.minimum(tf.maximum(tf.cast(tf.floor(min_ratio * tf.cast(n, tf.float32)), tf.int32), 1), high)
  length = tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)
  return tf.minimum(length, n)


def document_span(tokens, seed, *, eos_id, min_ratio=DOCUMENT_MIN_RATIO, infill_prob=GPT_INFILL_PROB,
                  first_kept=0):
  """The [gMASK] span of GLM's 'gpt' branch (blocklm_utils.py lines 403-440): (starts [1],
  lengths [1], suffix).

  `suffix` (several documents in the sample, i.e. an eos before the last token, or with
  probability `infill_prob`, lines 408-410): the span is the last L tokens and the example is
  `suffix_example`'s. Otherwise the span sits at a random offset in tokens[first_kept : n - 1]
  (`sample_span_in_document`: a leading [CLS] and the last token are never masked, lines
  119-129) and is an ordinary block with <eop>. `first_kept` is 1 when the sample starts
  with [CLS].
  """
  tokens = tf.cast(tokens, tf.int32)
  n = tf.size(tokens)
  length_seed, variant_seed, place_seed = split_seeds(seed, 3)
  length = document_length(n, length_seed, min_ratio=min_ratio)
  several_documents = tf.reduce_any(tf.equal(tokens[:-1], eos_id))
  room = n - 1 - first_kept - length
  suffix = (several_documents | (tf.random.stateless_uniform([], variant_seed) < infill_prob)
            | (room < 0))
  offset = first_kept + tf.random.stateless_uniform([], place_seed, minval=0, maxval=tf.maximum(room, 0) + 1,
                                                    dtype=tf.int32)
  start = tf.where(suffix, n - length, offset)
  return tf.reshape(start, [1]), tf.reshape(length, [1]), suffix


def suffix_example(tokens, length, *, gmask_id, sop_id):
  """GLM's [gMASK] suffix example (blocklm_utils.py lines 411-432): Part A = the first n - L
  tokens + [gMASK], Part B = <sop> + suffix[:-1] with targets the suffix (no <eop>), at the
  mask's position, block positions 1..L."""
  tokens = tf.cast(tokens, tf.int32)
  division = tf.size(tokens) - length
  target = tokens[division:]
  return assemble_example(tf.concat([tokens[:division], [gmask_id]], 0), tf.concat([[sop_id], target[:-1]], 0),
                          target, tf.fill([length], division), tf.range(1, length + 1))


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


def max_document_tokens(max_length: Optional[int], objectives, cls_first: bool = False) -> Optional[int]:
  """Longest document chunk whose example fits `max_length` (see SPAN_OVERHEAD)."""
  if max_length is None:
    return None
  room = max_length - int(cls_first)
  if set(objectives) <= {"document"}:
    return room - 2
  return int(room / SPAN_OVERHEAD)


# GLM-10B's released pretraining data options (THUDM/GLM config/ds_block_10B.sh: --bert-prob 0.5
# --gap-sentence-prob 0.3 --gpt-min-ratio 0.25 --block-mask-prob 0.1 --short-seq-prob 0.02; every
# sample starts with [CLS], `generate_blank_data` line 273 asserts it), as blank_infilling kwargs:
# blank_infilling(ds, ..., **GLM_10B_OPTIONS). [CLS] and block masking need a vocabulary with
# the [CLS] / [dBLOCK] pieces (GLM-10B's tokenizer; the shipped one has neither).
GLM_10B_OPTIONS = dict(rates=GLM_10B_RATES, document_min_ratio=0.25, gpt_infill_prob=GPT_INFILL_PROB,
                       block_mask_prob=0.1, short_seq_prob=0.02, cls_first=True)
CLS = "[CLS]"
DBLOCK = "[dBLOCK]"


def _piece_id(vocabulary, piece: str, option: str) -> int:
  tokenizer = vocabulary.tokenizer
  i = tokenizer.piece_to_id(piece)
  if i == tokenizer.unk_id() and piece != tokenizer.id_to_piece(i):
    raise ValueError(f"{option} needs a {piece} piece in the vocabulary, which "
                     f"{vocabulary.sentencepiece_model_file} lacks; use a vocabulary with it "
                     f"(GLM-10B's) or turn {option} off")
  return int(i)


def block_mask(example, seed, *, dblock_id, prob):
  """GLM `block_mask_prob` (make_block_data, lines 195-198): each span token fed as a Part B
  input (not <sop>) is replaced by [dBLOCK] with probability `prob`; targets are unchanged."""
  tokens = example["tokens"]
  span_input = (example["bidirectional"] == 0) & (example["block_positions"] > 1)
  hit = span_input & (tf.random.stateless_uniform(tf.shape(tokens), seed) < prob)
  return dict(example, tokens=tf.where(hit, tf.constant(dblock_id, tf.int32), tokens))


def short_pieces(tokens, seed, *, end_table, eos_id, max_length):
  """GLM `split_samples` (lines 283-310), the `short_seq_prob` branch: a target length
  t = randrange(32, max_length - 1), (max_length - 1) // t pieces; each starts at a random
  point moved back to a sentence start and ends at t tokens moved back to a sentence end
  (kept at t when that leaves less than t // 2). Sentence ends: `contains_sentence_end`
  or eos."""
  tokens = tf.cast(tokens, tf.int32)
  n = tf.size(tokens)
  length_seed, start_seed = split_seeds(seed, 2)
  t = tf.random.stateless_uniform([], length_seed, minval=32, maxval=max(max_length - 1, 33), dtype=tf.int32)
  count = tf.maximum((max_length - 1) // t, 1)
  is_end = tf.gather(end_table, tokens) | tf.equal(tokens, eos_id)
  index = tf.range(n)
  # A piece may start at 0 or right after a sentence end, never on an eos.
  can_start = tf.concat([[True], is_end[:-1]], 0) & tf.not_equal(tokens, eos_id)
  can_start = can_start | tf.equal(index, 0)
  ends_here = tf.concat([is_end, [False]], 0)  # ends_here[e]: a piece may end before index e

  def piece(i):
    drawn = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(start_seed, i),
                                        minval=0, maxval=tf.maximum(n - t, 1), dtype=tf.int32)
    start = tf.reduce_max(tf.where(can_start & (index <= drawn), index, 0))
    e = tf.range(n + 1)
    fits = (e > start) & (e <= start + t) & tf.gather(ends_here, tf.maximum(e - 1, 0))
    end = tf.reduce_max(tf.where(fits, e, start))
    end = tf.where(end - start < t // 2, start + t, end)
    return tf.cond(t >= n, lambda: tokens, lambda: tokens[start:tf.minimum(end, n)])

  return tf.data.Dataset.range(tf.cast(count, tf.int64)).map(lambda i: piece(tf.cast(i, tf.int32)))


def blank_infilling(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]] = None,
                    output_features: Optional[Mapping[str, seqio.Feature]] = None,
                    *,
                    objective: Optional[str] = None,
                    rates: Optional[Mapping[str, float]] = None,
                    mask_ratio: float = MASK_RATIO,
                    poisson_lambda: float = POISSON_LAMBDA,
                    max_span_length: int = MAX_SPAN_LENGTH,
                    document_min_ratio: float = DOCUMENT_MIN_RATIO,
                    gpt_infill_prob: float = GPT_INFILL_PROB,
                    shuffle_spans: bool = True,
                    cls_first: bool = False,
                    block_mask_prob: float = 0.0,
                    short_seq_prob: float = 0.0,
                    input_key: str = "targets") -> tf.data.Dataset:
  """GLM blank infilling: token ids in `input_key` -> flat GLM examples.

  `objective` picks one of "token" | "sentence" | "document"; otherwise each
  example draws its objective with `rates` (default GLM-10B: 0.5 token, 0.3
  sentence, 0.2 document; `GLM_130B_RATES` is 0.3 token / 0.7 document).
  `document_min_ratio` / `gpt_infill_prob` are GLM's --gpt-min-ratio /
  --gpt-infill-prob; `cls_first`, `block_mask_prob`, `short_seq_prob` GLM's
  [CLS]-first samples, --block-mask-prob and --short-seq-prob (GLM_10B_OPTIONS
  has GLM-10B's released values). Deterministic from seqio's preprocessor seed.
  """
  rates = _resolve_rates(objective, rates)
  if not 0 < mask_ratio < 0.5:
    raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 0.5)")
  if not 0 <= document_min_ratio < 1:
    raise ValueError(f"document_min_ratio={document_min_ratio} must be in [0, 1) (GLM --gpt-min-ratio)")
  for name, prob in (("gpt_infill_prob", gpt_infill_prob), ("block_mask_prob", block_mask_prob),
                     ("short_seq_prob", short_seq_prob)):
    if not 0 <= prob <= 1:
      raise ValueError(f"{name}={prob} must be a probability in [0, 1]")
  vocabulary = vocabulary_of(output_features)
  ids = vocab_lib.special_ids(vocabulary)
  cls_id = _piece_id(vocabulary, CLS, "cls_first") if cls_first else None
  dblock_id = _piece_id(vocabulary, DBLOCK, "block_mask_prob") if block_mask_prob > 0 else None
  max_length = row_length(sequence_length)
  if short_seq_prob > 0 and max_length is None:
    raise ValueError("short_seq_prob needs a sequence_length (GLM draws the short length below it)")
  needs_ends = "sentence" in rates or short_seq_prob > 0
  end_table = tf.constant(sentence_end_table(vocabulary)) if needs_ends else None
  names = list(rates)
  log_rates = tf.math.log(tf.constant([[rates[k] for k in names]], tf.float32))
  mask_ids = {"token": ids.mask, "sentence": ids.smask, "document": ids.gmask}
  first = int(cls_first)

  def spans_for(name, tokens, seed, max_spans):
    """(starts, lengths, mask id, suffix, is_token) of `tokens` (the sample, [CLS] first with
    cls_first); spans never cover the [CLS]. No tf.cond in here: tf.data cannot checkpoint an
    iterator whose switch_case branches hold one ("Case is stateful")."""
    if name == "document":
      starts, lengths, suffix = document_span(tokens, seed, eos_id=ids.eos, min_ratio=document_min_ratio,
                                              infill_prob=gpt_infill_prob, first_kept=first)
      return starts, lengths, tf.constant(ids.gmask, tf.int32), suffix, tf.constant(False)
    body = tokens[first:]
    if name == "token":
      starts, lengths = token_spans(tf.size(body), seed, max_spans=max_spans, mask_ratio=mask_ratio,
                                    poisson_lambda=poisson_lambda, max_span_length=max_span_length)
    else:
      starts, lengths = sentence_spans(body, seed, end_table=end_table, max_spans=max_spans,
                                       mask_ratio=mask_ratio)
    return (starts + first, lengths, tf.constant(mask_ids[name], tf.int32), tf.constant(False),
            tf.constant(name == "token"))

  @seqio.map_over_dataset(num_seeds=1)
  def make_example(tokens, seed):
    choice_seed, span_seed, shuffle_seed, mask_seed = split_seeds(seed, 4)
    tokens = tf.cast(tokens, tf.int32)
    if cls_id is not None:
      tokens = tf.concat([[cls_id], tokens], 0)
    n = tf.size(tokens)
    max_spans = n if max_length is None else (max_length - n) // 2
    if len(names) == 1:
      starts, lengths, mask_id, suffix, is_token = spans_for(names[0], tokens, span_seed, max_spans)
    else:
      branch = tf.random.stateless_categorical(log_rates, 1, choice_seed, dtype=tf.int32)[0, 0]
      starts, lengths, mask_id, suffix, is_token = tf.switch_case(
          branch, [functools.partial(spans_for, name, tokens, span_seed, max_spans) for name in names])
    example = tf.cond(
        suffix, lambda: suffix_example(tokens, lengths[0], gmask_id=ids.gmask, sop_id=ids.sop),
        lambda: build_blank_infilling_example(tokens, starts, lengths, mask_id, shuffle_seed, sop_id=ids.sop,
                                              eop_id=ids.eop, shuffle_spans=shuffle_spans))
    if dblock_id is not None:  # GLM: [MASK] blocks only (task == 'bert')
      example = block_mask(example, mask_seed, dblock_id=dblock_id,
                           prob=tf.where(is_token, block_mask_prob, 0.0))
    return example

  chunked = chunk_documents(dataset, max_document_tokens(max_length, names, cls_first), key=input_key)
  if short_seq_prob > 0:
    chunked = _maybe_short(chunked, short_seq_prob, end_table=end_table, eos_id=ids.eos,
                           max_length=max_document_tokens(max_length, names, cls_first))
  return make_example(chunked)


def _maybe_short(chunks: tf.data.Dataset, prob: float, *, end_table, eos_id, max_length: int):
  """With probability `prob` a chunk becomes GLM's short pieces (`short_pieces`), else stays."""
  @seqio.map_over_dataset(num_seeds=2)
  def draw(tokens, seeds):
    return {"tokens": tokens, "short": tf.random.stateless_uniform([], seeds[0]) < prob, "seed": seeds[1]}

  def expand(ex):
    return tf.cond(ex["short"],
                   lambda: short_pieces(ex["tokens"], ex["seed"], end_table=end_table, eos_id=eos_id,
                                        max_length=max_length),
                   lambda: tf.data.Dataset.from_tensors(ex["tokens"]))

  return draw(chunks).flat_map(expand)


def prefix_lm(dataset, sequence_length=None, output_features=None, *,
              min_ratio: float = DOCUMENT_MIN_RATIO, input_key: str = "targets"):
  """Prefix LM: the suffix variant of the document objective (`[gMASK]` after a bidirectional
  prefix, the last L tokens generated, L = randint(int(min_ratio * n), n - 2))."""
  return blank_infilling(dataset, sequence_length, output_features, objective="document",
                         document_min_ratio=min_ratio, gpt_infill_prob=1.0, input_key=input_key)


def causal_lm(dataset, sequence_length=None, output_features=None, *, input_key: str = "targets"):
  """Causal LM: Part A empty, the whole chunk is one Part B span (<sop> doc -> doc <eop>)."""
  ids = vocab_lib.special_ids(vocabulary_of(output_features))
  max_length = row_length(sequence_length)
  chunked = chunk_documents(dataset, None if max_length is None else max_length - 1, key=input_key)
  return chunked.map(lambda t: build_causal_example(t, sop_id=ids.sop, eop_id=ids.eop),
                     num_parallel_calls=tf.data.AUTOTUNE)
