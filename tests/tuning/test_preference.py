"""Preference pairs as seqio tasks: adjacent chosen / rejected rows with one prompt, loss on
the response predictions only, both formats, the toy corpus set."""

import uuid

import numpy as np
import pytest
import seqio

from glmjax.tasks import preference
from glmjax.tasks import vocab as vocab_lib

RECORDS = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven hundred."},
           {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."},
           {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three."}]


@pytest.fixture(scope="module")
def task():
  name = f"glmjax_test_prefs_{uuid.uuid4().hex[:8]}"
  preference.register_preference_task(name, lambda split: RECORDS if split == "train" else RECORDS[:1])
  yield name
  seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("style", preference.STYLES)
def test_pairs_sit_in_adjacent_rows_with_one_prompt(task, style):
  vocab = vocab_lib.default_vocabulary()
  ids = vocab_lib.special_ids(vocab)
  stats = preference.PairStats()
  batches = list(preference.pair_batches(task, "train", pairs=3, sequence_length=32, style=style,
                                         stats=stats))
  assert len(batches) == 1 and stats.pairs == 3 and stats.dropped == 0
  batch = batches[0]
  assert batch["tokens"].shape == (6, 32)
  for i, record in enumerate(RECORDS):
    for row, field in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
      mask = batch["loss_mask"][row] > 0
      targets = batch["targets"][row][mask]
      end = ids.eop if style == "chatglm3" else ids.eos
      assert targets[-1] == end
      assert vocab.decode(targets[:-1].tolist()) == record[field]
      first = np.argmax(mask)
      np.testing.assert_array_equal(batch["tokens"][2 * i, :first + 1], batch["tokens"][2 * i + 1, :first + 1])
      assert record["prompt"] in vocab.decode(batch["tokens"][row, :first + 1].tolist())
      np.testing.assert_array_equal(batch["targets"][row, :-1][batch["segment_ids"][row, 1:] > 0],
                                    batch["tokens"][row, 1:][batch["segment_ids"][row, 1:] > 0])
    if style == "chatglm3":
      assert list(batch["tokens"][2 * i, :4]) == [ids.gmask, ids.sop, ids.user, ids.newline]


def test_long_prompts_are_dropped_and_long_responses_cut(task):
  stats = preference.PairStats()
  assert list(preference.pair_batches(task, "train", pairs=1, sequence_length=4, stats=stats)) == []
  assert stats.dropped == 3
  stats = preference.PairStats()
  batch = next(preference.pair_batches(task, "train", pairs=1, sequence_length=9, stats=stats))
  assert stats.truncated >= 1 and batch["loss_mask"][0, -1] == 1.0


def test_toy_corpus_set_and_bad_style(task):
  records = preference.corpus_preference_records("validation")
  assert len(records) > 10 and all(r["chosen"] != r["rejected"] for r in records)
  assert sorted(records[0]) == ["chosen", "prompt", "rejected"]
  with pytest.raises(ValueError, match="style="):
    next(preference.pair_batches(task, "train", pairs=1, sequence_length=16, style="alpaca"))
