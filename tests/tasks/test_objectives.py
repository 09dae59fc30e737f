"""GLM blank-infilling invariants on many random and real documents."""

import functools
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from glmjax.tasks import corpus, objectives, vocab
from tests.tasks import reference

IDS = vocab.special_ids()
MASKS = (IDS.mask, IDS.smask, IDS.gmask)
LENGTH = 512


def random_documents(count, seed=0, low=20, high=440):
  rng = np.random.default_rng(seed)
  return [rng.integers(13, 8192, size=int(rng.integers(low, high))).astype(np.int32) for _ in range(count)]


def run(documents, preprocessor, seed=1):
  ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in documents),
                                      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  with seqio.map_seed_manager(seed):
    return list(preprocessor(ds).as_numpy_iterator())


def blank(objective=None, rates=None, length=LENGTH, **kwargs):
  return functools.partial(objectives.blank_infilling, sequence_length={"tokens": length},
                           output_features=None, objective=objective, rates=rates, **kwargs)


@functools.lru_cache(maxsize=None)
def token_level_examples():
  documents = random_documents(300)
  return documents, run(documents, blank("token"))


def test_token_level_reconstructs_and_matches_spec():
  documents, examples = token_level_examples()
  assert len(examples) == len(documents)
  for document, example in zip(documents, examples):
    part_a, spans = reference.check_glm_example(example, document, sop_id=IDS.sop, eop_id=IDS.eop,
                                                mask_ids=(IDS.mask,))
    assert len(example["tokens"]) <= LENGTH
    mask_at = np.flatnonzero(part_a == IDS.mask)
    assert len(mask_at) == len(spans) >= 1
    assert (np.diff(mask_at) >= 2).all(), "two [MASK] spans are adjacent"


def test_token_level_statistics():
  documents, examples = token_level_examples()
  masked, spans = 0, []
  for example in examples:
    targets = example["targets"][example["bidirectional"] == 0]
    ends = np.flatnonzero(targets == IDS.eop)
    spans.extend(np.diff(np.concatenate([[-1], ends])) - 1)
  masked = sum(spans)
  fraction = masked / sum(len(d) for d in documents)
  k = np.arange(1, 40)
  pmf = np.array([3.0 ** i * math.exp(-3.0) / math.factorial(i) for i in k])
  truncated_poisson_mean = float((k * pmf).sum() / pmf.sum())
  assert abs(fraction - 0.15) < 0.01, fraction
  assert abs(np.mean(spans) - truncated_poisson_mean) < 0.15, (np.mean(spans), truncated_poisson_mean)
  assert abs(np.mean(spans) - 3.0) < 0.3
  assert min(spans) >= 1 and max(spans) <= 39


def test_shuffled_span_order_differs_from_text_order_sometimes():
  _, examples = token_level_examples()
  shuffled = 0
  for example in examples:
    b = example["bidirectional"] == 0
    order = example["positions"][b][example["tokens"][b] == IDS.sop]
    shuffled += int((np.diff(order) < 0).any())
  assert shuffled > len(examples) // 2


@functools.lru_cache(maxsize=None)
def real_documents(count=80):
  v = vocab.default_vocabulary()
  docs = corpus.load("shakespeare", "validation")[:count // 2] + corpus.load("poems_zh", "train")[:count // 2]
  return [np.asarray(v.tokenizer.encode(d["text"])[:440], np.int32) for d in docs]


def test_sentence_level_masks_whole_sentences():
  documents = real_documents()
  end_table = objectives.sentence_end_table(vocab.default_vocabulary())
  for document, example in zip(documents, run(documents, blank("sentence"))):
    part_a, spans = reference.check_glm_example(example, document, sop_id=IDS.sop, eop_id=IDS.eop,
                                                mask_ids=(IDS.smask,))
    masked = sum(len(s[2]) - 1 for s in spans)
    sentences = np.split(document, np.flatnonzero(end_table[document]) + 1)
    sentences = [s for s in sentences if len(s)]
    assert masked >= int(0.15 * len(document)) or masked == len(document)
    # Every span is a run of whole sentences: it starts and ends on sentence bounds.
    starts = set(np.cumsum([0] + [len(s) for s in sentences])[:-1])
    ends = set(np.cumsum([len(s) for s in sentences]))
    cursor = 0
    by_position = {p: len(t) - 1 for p, _, t, _, _ in spans}
    for i, token in enumerate(part_a):
      if i in by_position:
        assert cursor in starts and cursor + by_position[i] in ends
        cursor += by_position[i]
      else:
        cursor += 1


def document_variant(example, document, *, first_kept=0):
  """("suffix" | "offset", L) of a [gMASK] example, each variant checked against GLM's code
  (blocklm_utils.py lines 410-432 and 434-437 through make_block_data)."""
  n = len(document)
  part_a, spans = reference.split_parts(example, IDS.sop)
  assert len(spans) == 1 and list(part_a).count(IDS.gmask) == 1
  position, tokens, targets, positions, blocks = spans[0]
  length = len(tokens)  # <sop> + L - 1 inputs (suffix) or <sop> + L inputs (offset)
  np.testing.assert_array_equal(positions, position)
  np.testing.assert_array_equal(blocks, np.arange(1, len(tokens) + 1))
  np.testing.assert_array_equal(example["loss_mask"], 1 - np.asarray(example["bidirectional"]))
  if targets[-1] != IDS.eop:  # suffix: the last L tokens, no <eop>
    L = length
    np.testing.assert_array_equal(part_a, np.concatenate([document[:n - L], [IDS.gmask]]))
    np.testing.assert_array_equal(tokens, np.concatenate([[IDS.sop], document[n - L:n - 1]]))
    np.testing.assert_array_equal(targets, document[n - L:])
    assert position == n - L
    return "suffix", L
  L = length - 1
  reference.check_glm_example(example, document, sop_id=IDS.sop, eop_id=IDS.eop, mask_ids=(IDS.gmask,))
  assert first_kept <= position and position + L <= n - 1, "the span covers [CLS] or the last token"
  return "offset", L


@functools.lru_cache(maxsize=None)
def document_examples(ratio=objectives.DOCUMENT_MIN_RATIO):
  documents = random_documents(1500, seed=3, low=40, high=400)
  return documents, run(documents, blank("document", document_min_ratio=ratio))


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_document_length_is_glms_randint_and_half_the_spans_sit_at_a_random_offset(ratio):
  """L = randint(int(ratio n), n - 2) (line 403); suffix with gpt_infill_prob 0.5 (line 410)."""
  documents, examples = document_examples(ratio)
  variants, lengths, low, high = [], [], [], []
  for document, example in zip(documents, examples):
    variant, L = document_variant(example, document)
    n = len(document)
    variants.append(variant)
    lengths.append(L)
    low.append(int(ratio * n))
    high.append(n - 2)
  lengths, low, high = map(np.array, (lengths, low, high))
  assert (lengths >= low).all() and (lengths <= high).all()
  assert (lengths == low).sum() > 0, "the minimum int(ratio * n) is never drawn"
  # Mean of the uniform integer draws, within 4 standard errors.
  mean, var = (low + high) / 2, ((high - low + 1) ** 2 - 1) / 12
  assert abs(lengths.mean() - mean.mean()) < 4 * np.sqrt(var.sum()) / len(lengths)
  offset_share = np.mean(np.array(variants) == "offset")
  assert abs(offset_share - 0.5) < 4 * np.sqrt(0.25 / len(variants)), offset_share


def test_document_with_several_documents_is_always_a_suffix():
  """multiple_doc (an eos before the end, line 408) always takes the suffix variant."""
  documents = random_documents(200, seed=8, low=40, high=200)
  for d in documents:
    d[len(d) // 2] = IDS.eos
  for document, example in zip(documents, run(documents, blank("document"))):
    assert document_variant(example, document)[0] == "suffix"


def test_prefix_lm_is_the_suffix_variant_only():
  documents = random_documents(100, seed=9, low=10, high=200)
  examples = run(documents, functools.partial(objectives.prefix_lm, sequence_length={"tokens": LENGTH}))
  for document, example in zip(documents, examples):
    assert document_variant(example, document)[0] == "suffix"


def test_short_documents_still_give_valid_examples():
  documents = random_documents(200, seed=10, low=1, high=6)
  for document, example in zip(documents, run(documents, blank("document"))):
    variant, L = document_variant(example, document)
    assert 1 <= L <= len(document)


def test_span_order_is_unbiased_like_the_reference():
  """The rightmost [MASK] span is a random one of the draws, as in GLM (lengths shuffled before
  `sample_spans`, lines 117 / 271), not the draw that crossed 15% (longer on average)."""
  documents, examples = token_level_examples()
  rightmost, every = [], []
  for example in examples:
    part_a, spans = reference.split_parts(example, IDS.sop)
    by_position = {p: len(t) - 1 for p, t, _, _, _ in spans}
    every.extend(by_position.values())
    rightmost.append(by_position[max(by_position)])
  # The reference, simulated: draws until >= int(0.15 n), shuffled; the last one is placed rightmost.
  rng = np.random.default_rng(0)
  k = np.arange(1, 40)
  pmf = np.array([3.0 ** i * math.exp(-3.0) / math.factorial(i) for i in k])
  simulated = []
  for _ in range(20):
    for document in documents:
      draws = []
      while sum(draws) < int(0.15 * len(document)):
        draws.append(int(rng.choice(k, p=pmf / pmf.sum())))
      simulated.append(draws[rng.integers(len(draws))])
  sd = np.std(every) / np.sqrt(len(rightmost))
  assert abs(np.mean(rightmost) - np.mean(simulated)) < 4 * sd, (np.mean(rightmost), np.mean(simulated))
  assert abs(np.mean(rightmost) - np.mean(every)) < 4 * sd


def test_sentence_ends_are_exactly_glms_contains_sentence_end():
  """blocklm_utils.py lines 76-89: '.', '?', '!', ';', ':' or a newline in the piece."""
  v = vocab.default_vocabulary()
  table = objectives.sentence_end_table(v)
  sp = v.tokenizer
  for i in range(sp.get_piece_size()):
    if sp.is_control(i) or sp.is_unknown(i):
      assert not table[i]
      continue
    piece = sp.id_to_piece(i)
    text = "\n" if piece == "<0x0A>" else ("" if sp.is_byte(i) else piece)
    assert table[i] == any(c in text for c in ".?!;:\n"), piece
  for piece in ("。", "？", "！"):
    if sp.piece_to_id(piece) != sp.unk_id():
      assert not table[sp.piece_to_id(piece)], f"{piece} is no sentence end in GLM's code"
  assert table[IDS.newline]


def test_mixed_rates_follow_glm_130b_preset():
  documents = random_documents(400, seed=4, high=200)
  chosen = []
  for document, example in zip(documents, run(documents, blank(rates=objectives.GLM_130B_RATES))):
    part_a, _ = reference.split_parts(example, IDS.sop)
    if IDS.gmask in part_a:
      document_variant(example, document)
    else:
      reference.check_glm_example(example, document, sop_id=IDS.sop, eop_id=IDS.eop, mask_ids=MASKS)
    kinds = {t for t in part_a if t in MASKS}
    assert len(kinds) == 1
    chosen.append(kinds.pop())
  document_share = np.mean(np.array(chosen) == IDS.gmask)
  assert abs(document_share - 0.7) < 0.08
  assert IDS.smask not in chosen


def test_long_documents_are_chunked_to_fit_and_reconstruct():
  document = random_documents(1, seed=5, low=1500, high=1501)[0]
  for objective in objectives.OBJECTIVES:
    examples = run([document], blank(objective, length=128))
    rebuilt = []
    for example in examples:
      assert len(example["tokens"]) <= 128
      part_a, spans = reference.split_parts(example, IDS.sop)
      rebuilt.extend(reference.fill_blanks(part_a, spans, MASKS, eop_id=IDS.eop))
    assert rebuilt == list(document)


def test_causal_lm_is_one_span_with_empty_part_a():
  documents = random_documents(20, seed=6)
  examples = run(documents, functools.partial(objectives.causal_lm, sequence_length={"tokens": LENGTH}))
  for document, example in zip(documents, examples):
    np.testing.assert_array_equal(example["tokens"], np.concatenate([[IDS.sop], document]))
    np.testing.assert_array_equal(example["targets"], np.concatenate([document, [IDS.eop]]))
    np.testing.assert_array_equal(example["loss_mask"], 1)
    np.testing.assert_array_equal(example["bidirectional"], 0)
    np.testing.assert_array_equal(example["positions"], 0)
    np.testing.assert_array_equal(example["block_positions"], np.arange(1, len(document) + 2))


def test_same_seed_same_examples_different_seed_different():
  documents = random_documents(30, seed=7)
  first, again, other = (run(documents, blank(), seed=s) for s in (11, 11, 12))
  for x, y in zip(first, again):
    for k in objectives.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))


@pytest.mark.parametrize("kwargs, field", [
    ({"objective": "word"}, "objective"),
    ({"rates": {"token": 0.5, "paragraph": 0.5}}, "unknown objectives"),
    ({"objective": "token", "rates": {"token": 1.0}}, "either objective"),
    ({"objective": "token", "mask_ratio": 0.7}, "mask_ratio"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  ds = tf.data.Dataset.from_tensors({"targets": tf.constant([20, 21], tf.int32)})
  with pytest.raises(ValueError, match=field):
    objectives.blank_infilling(ds, **kwargs)


def test_missing_input_feature_is_reported():
  ds = tf.data.Dataset.from_tensors({"text": tf.constant("hello")})
  with pytest.raises(ValueError, match="'targets'"):
    objectives.blank_infilling(ds, objective="token")


# ---------------------------------------------------------------- GLM-10B data options


@pytest.fixture(scope="module")
def glm10b_vocabulary(tmp_path_factory):
  """The shipped vocabulary plus GLM-10B's [CLS] and [dBLOCK] pieces (user-defined symbols)."""
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(vocab.default_vocabulary().sp_model)
  for piece in (objectives.CLS, objectives.DBLOCK):
    proto.pieces.add(piece=piece, score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  path = tmp_path_factory.mktemp("vocab") / "glm10b_like.model"
  path.write_bytes(proto.SerializeToString())
  return vocab.GLMVocabulary(str(path))


def run_with(documents, vocabulary, seed=1, length=LENGTH, **kwargs):
  features = {"tokens": seqio.Feature(vocabulary)}
  return run(documents, functools.partial(objectives.blank_infilling, sequence_length={"tokens": length},
                                          output_features=features, **kwargs), seed=seed)


def test_cls_first_starts_every_sample_and_is_never_masked(glm10b_vocabulary):
  """GLM samples start with [CLS] (`generate_blank_data` line 273); no span covers it."""
  cls = glm10b_vocabulary.tokenizer.piece_to_id(objectives.CLS)
  documents = random_documents(300, seed=11, low=20, high=300)
  for objective in objectives.OBJECTIVES:
    examples = run_with(documents, glm10b_vocabulary, objective=objective, cls_first=True)
    for document, example in zip(documents, examples):
      assert example["tokens"][0] == cls and example["bidirectional"][0] == 1
      sample = np.concatenate([[cls], document])
      if objective == "document":
        document_variant(example, sample, first_kept=1)
      else:
        reference.check_glm_example(example, sample, sop_id=IDS.sop, eop_id=IDS.eop, mask_ids=MASKS)


def test_block_mask_replaces_a_tenth_of_token_span_inputs(glm10b_vocabulary):
  """--block-mask-prob 0.1 (make_block_data lines 195-198): span inputs of [MASK] blocks become
  [dBLOCK] with probability 0.1; <sop> and the targets are untouched."""
  dblock = glm10b_vocabulary.tokenizer.piece_to_id(objectives.DBLOCK)
  documents = random_documents(300, seed=12)
  plain = run_with(documents, glm10b_vocabulary, objective="token")
  masked = run_with(documents, glm10b_vocabulary, objective="token", block_mask_prob=0.1)
  hits = inputs = 0
  for x, y in zip(plain, masked):
    for k in objectives.FEATURES:
      if k != "tokens":
        np.testing.assert_array_equal(x[k], y[k])
    span_input = (x["bidirectional"] == 0) & (x["block_positions"] > 1)
    changed = x["tokens"] != y["tokens"]
    assert not (changed & ~span_input).any()
    assert (y["tokens"][changed] == dblock).all()
    hits += int(changed.sum())
    inputs += int(span_input.sum())
  assert abs(hits / inputs - 0.1) < 4 * np.sqrt(0.09 / inputs), hits / inputs


def test_short_seq_prob_splits_samples_into_glms_short_pieces():
  """--short-seq-prob (split_samples, lines 283-310): t = randrange(32, L - 1),
  (L - 1) // t pieces of the sample, each starting on a sentence start and at most t long."""
  v = vocab.default_vocabulary()
  documents = [d[:200] for d in real_documents()]  # one chunk each (room 222)
  end_table = objectives.sentence_end_table(v)
  examples = run(documents, blank("token", length=256, short_seq_prob=1.0))
  assert len(examples) > len(documents)
  room = objectives.max_document_tokens(256, ["token"])
  for example in examples:
    part_a, spans = reference.split_parts(example, IDS.sop)
    piece = np.array(reference.fill_blanks(part_a, spans, MASKS, eop_id=IDS.eop))
    source = next(d for d in documents if any(np.array_equal(d[i:i + len(piece)], piece)
                                                for i in range(len(d) - len(piece) + 1)))
    starts = [i for i in range(len(source) - len(piece) + 1)
              if np.array_equal(source[i:i + len(piece)], piece)]
    if len(piece) < len(source):  # t < n: a piece of at most t <= room - 2 tokens
      assert any(i == 0 or end_table[source[i - 1]] for i in starts)
      assert len(piece) <= room - 2


def test_glm_10b_options_by_name(glm10b_vocabulary):
  assert objectives.GLM_10B_OPTIONS == dict(
      rates={"token": 0.5, "sentence": 0.3, "document": 0.2}, document_min_ratio=0.25,
      gpt_infill_prob=0.5, block_mask_prob=0.1, short_seq_prob=0.02, cls_first=True)
  documents = random_documents(100, seed=13)
  examples = run_with(documents, glm10b_vocabulary, **objectives.GLM_10B_OPTIONS)
  cls = glm10b_vocabulary.tokenizer.piece_to_id(objectives.CLS)
  assert len(examples) >= len(documents) and all(e["tokens"][0] == cls for e in examples)


@pytest.mark.parametrize("kwargs, field", [
    ({"cls_first": True}, "cls_first needs a \\[CLS\\] piece"),
    ({"block_mask_prob": 0.1}, "block_mask_prob needs a \\[dBLOCK\\] piece"),
    ({"document_min_ratio": 1.0}, "document_min_ratio"),
    ({"gpt_infill_prob": 1.5}, "gpt_infill_prob"),
])
def test_glm_10b_options_need_their_pieces_and_sane_values(kwargs, field):
  ds = tf.data.Dataset.from_tensors({"targets": tf.constant([20, 21], tf.int32)})
  with pytest.raises(ValueError, match=field):
    objectives.blank_infilling(ds, sequence_length={"tokens": 64}, **kwargs)


def test_a_task_registered_with_glm_10b_options_packs_cls_first_rows(glm10b_vocabulary):
  from glmjax.tasks import get_dataset, registry, sources  # pylint: disable=import-outside-toplevel
  name = "test_glm10b_options_task"
  if name not in seqio.TaskRegistry.names():
    source = sources.records_source(functools.partial(corpus.load, "shakespeare"), registry.SPLITS, ["text"])
    registry.register_text_task(name, source, vocabulary=glm10b_vocabulary, **objectives.GLM_10B_OPTIONS)
  cls = glm10b_vocabulary.tokenizer.piece_to_id(objectives.CLS)
  batch = next(get_dataset(name, sequence_length=128, batch_size=2, split="validation", shuffle=False,
                           num_epochs=1).as_numpy_iterator())
  for r in range(2):
    starts = np.flatnonzero(np.diff(np.concatenate([[0], batch["segment_ids"][r]])) > 0)
    assert len(starts) >= 1 and (batch["tokens"][r][starts] == cls).all()
