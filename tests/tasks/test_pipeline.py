"""get_dataset end to end: registered tasks, batch contract, determinism, resuming, sources."""

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import glmjax.tasks as tasks
from glmjax.tasks import corpus, registry, sources

LENGTH, BATCH = 128, 4
CONTRACT = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
            "positions": np.int32, "block_positions": np.int32, "bidirectional": np.int32}
REGISTERED = [("glmjax_blank_infilling_default", "train"), ("glmjax_blank_infilling_default", "validation"),
              ("glmjax_blank_infilling_glm130b", "train"), ("glmjax_causal_lm", "train"),
              ("glmjax_flan", "validation"), ("glmjax_chat_arith", "train")]


def take(dataset, count):
  return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]



def first_validation_batch_then_remove(name):
  """The first validation batch of a test-registered task, which is then unregistered."""
  try:
    return take(tasks.get_dataset(name, sequence_length=LENGTH, batch_size=BATCH, split="validation",
                                  num_epochs=1, shuffle=False), 1)[0]
  finally:
    seqio.TaskRegistry.remove(name)

def check_contract(batch, vocab_size=8192):
  assert set(batch) == set(CONTRACT)
  for key, dtype in CONTRACT.items():
    assert batch[key].shape == (BATCH, LENGTH) and batch[key].dtype == dtype, key
  pad = batch["segment_ids"] == 0
  for key in CONTRACT:
    assert (batch[key][pad] == 0).all(), f"{key} is not zero on padding"
  assert ((batch["tokens"] >= 0) & (batch["tokens"] < vocab_size)).all()
  for row in range(BATCH):
    ids = batch["segment_ids"][row]
    for s in np.unique(ids[ids > 0]):
      where = np.flatnonzero(ids == s)
      assert (np.diff(where) == 1).all()
      bidirectional = batch["bidirectional"][row, where]
      a = int(bidirectional.sum())
      assert (bidirectional[:a] == 1).all()
      np.testing.assert_array_equal(batch["positions"][row, where][:a], np.arange(a))  # restart per segment
      assert not (batch["loss_mask"][row, where] * bidirectional).any(), "loss on Part A"


@pytest.mark.parametrize("name, split", REGISTERED)
def test_registered_mixtures_produce_the_batch_contract(name, split):
  batches = take(tasks.get_dataset(name, sequence_length=LENGTH, batch_size=BATCH, split=split, seed=3), 2)
  for batch in batches:
    check_contract(batch)
    assert batch["loss_mask"].sum() > 0 and (batch["segment_ids"] > 0).mean() > 0.5


def test_every_registered_task_has_a_validation_split():
  names = [n for n in seqio.TaskRegistry.names() if n.startswith("glmjax_")]
  assert len(names) >= 15
  for name in names:
    assert set(seqio.get_mixture_or_task(name).splits) == {"train", "validation"}


def default_pipeline(seed, **kwargs):
  return tasks.get_dataset("glmjax_blank_infilling_default", sequence_length=LENGTH, batch_size=BATCH,
                           seed=seed, **kwargs)


def test_same_seed_same_batches_different_seed_different():
  first, again, other = (take(default_pipeline(s), 3) for s in (7, 7, 8))
  for x, y in zip(first, again):
    for k in CONTRACT:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))


def test_resumed_iterator_continues_identically(tmp_path):
  reference = tasks.DatasetIterator(default_pipeline(9))
  for _ in range(3):
    next(reference)
  reference.save(tmp_path / "data" / "process_0")
  expected = [next(reference) for _ in range(3)]

  resumed = tasks.DatasetIterator(default_pipeline(9))
  resumed.restore(tmp_path / "data" / "process_0")
  for want in expected:
    got = next(resumed)
    for k in CONTRACT:
      np.testing.assert_array_equal(got[k], want[k])
  skipped = take(default_pipeline(9).skip(3), 1)[0]  # the fallback: skip by steps
  np.testing.assert_array_equal(skipped["tokens"], expected[0]["tokens"])
  with pytest.raises(FileNotFoundError, match="no iterator state"):
    tasks.DatasetIterator(default_pipeline(9)).restore(tmp_path / "missing")


def test_validation_epoch_ends_with_a_padded_batch():
  batches = take(tasks.get_dataset("glmjax_corpus_zh_blank_infilling", sequence_length=LENGTH, batch_size=BATCH,
                                   split="validation", shuffle=False, num_epochs=1), 1000)
  assert 1 <= len(batches) < 1000
  for batch in batches:
    assert batch["tokens"].shape == (BATCH, LENGTH)
  # Every validation poem, cut into chunks of int(LENGTH / 1.15) tokens, is one example: none lost or repeated.
  chunk = int(LENGTH / 1.15)
  lengths = [len(tasks.default_vocabulary().encode(d["text"])) for d in corpus.load("poems_zh", "validation")]
  segments = sum(int(np.max(row, initial=0)) for b in batches for row in b["segment_ids"])
  assert segments == sum(-(-n // chunk) for n in lengths)


def test_shards_read_disjoint_documents():
  seen = []
  for index in range(2):
    ds = seqio.get_mixture_or_task("glmjax_corpus_zh_causal_lm").get_dataset(
        {"tokens": 4096}, split="validation", shuffle=False, num_epochs=1,
        shard_info=seqio.ShardInfo(index=index, num_shards=2))
    seen.append({tuple(ex["tokens"].tolist()) for ex in ds.as_numpy_iterator()})
  assert len(seen[0]) + len(seen[1]) == 20 and not seen[0] & seen[1]


def test_unknown_names_and_splits_are_explained():
  with pytest.raises(ValueError, match="is not registered"):
    tasks.get_dataset("glmjax_nope", sequence_length=LENGTH, batch_size=BATCH)
  with pytest.raises(ValueError, match="split='test'"):
    tasks.get_dataset("glmjax_causal_lm", sequence_length=LENGTH, batch_size=BATCH, split="test")


def test_user_task_from_local_text_files(tmp_path):
  for split, count in (("train", 5), ("validation", 2)):
    (tmp_path / split).mkdir()
    for i in range(count):
      (tmp_path / split / f"{i}.txt").write_text(f"Document {i} of {split}. " * 30, encoding="utf-8")
  name = "test_pipeline_text_files"
  registry.register_text_task(name, sources.text_files_source(
      {s: str(tmp_path / s / "*.txt") for s in ("train", "validation")}), objective="document")
  batch = first_validation_batch_then_remove(name)
  check_contract(batch)
  assert (batch["tokens"] == tasks.special_ids().gmask).sum() >= 2


class TinyText(tfds.core.GeneratorBasedBuilder):
  """A two-split TFDS dataset built on the spot (the tfds wheel ships no dummy data)."""
  # A one-part module name keeps tfds 4.9 off its code-path lookup, which needs
  # the optional `importlib_resources` package for classes defined in packages.
  __module__ = "tiny_text"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "validation": self._generate_examples(3)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"text": f"Sentence number {i}. It has two parts; the second is here!"}


def test_tfds_source(tmp_path):
  TinyText(data_dir=str(tmp_path)).download_and_prepare()
  name = "test_pipeline_tfds"
  registry.register_text_task(name, seqio.TfdsDataSource("tiny_text:1.0.0", tfds_data_dir=str(tmp_path)),
                              objective="sentence")
  batch = first_validation_batch_then_remove(name)
  check_contract(batch)
  assert (batch["tokens"] == tasks.special_ids().smask).sum() >= 3
