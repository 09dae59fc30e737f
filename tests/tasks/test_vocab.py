"""The shipped vocabulary, tokenizer training, special tokens, and the `glmjax tokenizer` CLI."""

import json

import pytest
import sentencepiece as spm
import tensorflow as tf

from glmjax.cli import tokenizer as tokenizer_cli
from glmjax.tasks import corpus, vocab

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "  leading spaces, tabs\tand trailing  ",
    "Mixed 中文 and English [gMASK]<sop> with specials<eop>, digits 12345 and emoji 🙂.",
]
DOCUMENTED_IDS = {"pad": 0, "eos": 1, "unk": 2, "mask": 3, "smask": 4, "gmask": 5, "sop": 6, "eop": 7,
                  "system": 8, "user": 9, "assistant": 10, "observation": 11, "newline": 12}


def test_default_vocabulary_special_ids_are_single_documented_ids():
  v = vocab.default_vocabulary()
  assert v.vocab_size == 8192
  assert vars(vocab.special_ids()) == DOCUMENTED_IDS
  for token in vocab.SPECIAL_TOKENS:
    ids = v.tokenizer.encode(token)
    assert len([i for i in ids if v.tokenizer.id_to_piece(i) != "▁"]) == 1, (token, ids)
    assert v.tokenizer.piece_to_id(token) in ids


@pytest.mark.parametrize("text", TEXTS + [d["text"] for d in corpus.load("poems_zh", "validation")[:3]]
                         + [corpus.load("shakespeare", "validation")[0]["text"][:3000]])
def test_decode_encode_round_trip_python_and_tf(text):
  v = vocab.default_vocabulary()
  ids = v.encode(text)
  assert v.decode(ids) == text
  tf_ids = v.encode_tf(tf.constant(text)).numpy().tolist()
  assert tf_ids == ids
  # tf_text's detokenizer drops leading spaces; the Python decode above is exact.
  assert v.decode_tf(tf.constant(ids)).numpy().decode("utf-8") == text.lstrip(" ")


def test_every_character_of_the_training_corpus_has_a_piece():
  """Byte fallback is only for characters the tokenizer never saw."""
  v = vocab.default_vocabulary()
  seen = {c for source in corpus.SOURCES for d in corpus.load(source, "train") for c in d["text"]}
  validation = {c for d in corpus.load("poems_zh", "validation") for c in d["text"]}
  for character in sorted(validation & seen - {" "}):
    ids = v.tokenizer.encode(character)
    assert not any(v.tokenizer.is_byte(i) for i in ids), (character, ids)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "train.txt"
  lines = [d["text"] for d in corpus.load("shakespeare", "validation")[:6]]
  lines += [d["text"] for d in corpus.load("poems_zh", "train")[:10]]
  path.write_text("\n".join(lines), encoding="utf-8")
  return path


def test_cli_train_writes_a_model_with_specials_first(small_text, tmp_path, capsys):
  out = tmp_path / "tiny.model"
  assert tokenizer_cli.main(["train", "--input", f"{small_text}@2", "--vocab_size", "1200", "--out", str(out)]) == 0
  v = vocab.GLMVocabulary(out)
  assert v.vocab_size == 1200
  assert vars(v.special_ids) == DOCUMENTED_IDS
  for text in TEXTS:
    assert v.decode(v.encode(text)) == text
  assert "1200 ids" in capsys.readouterr().out


def test_cli_rejects_bad_input_spec(tmp_path, capsys):
  assert tokenizer_cli.main(["train", "--input", "x.txt@two", "--vocab_size", "900",
                             "--out", str(tmp_path / "m")]) == 2
  assert "repeat count" in capsys.readouterr().err
  assert tokenizer_cli.main(["train", "--input", str(tmp_path / "missing.txt"), "--vocab_size", "900",
                             "--out", str(tmp_path / "m")]) == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(ValueError, match="vocab_size"):
    vocab.train_sentencepiece([str(tmp_path)], 100, tmp_path / "m")


def test_add_specials_to_a_foreign_model(small_text, tmp_path, capsys):
  """A LLaMA-style model (no GLM specials, no pad) gets them appended as single ids."""
  prefix = tmp_path / "plain"
  spm.SentencePieceTrainer.train(input=str(small_text), model_prefix=str(prefix), vocab_size=1000,
                                 unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
  with pytest.raises(ValueError, match="add-specials"):
    vocab.GLMVocabulary(f"{prefix}.model")
  extended = tmp_path / "extended.model"
  assert tokenizer_cli.main(["add-specials", "--model", f"{prefix}.model", "--out", str(extended)]) == 0
  v = vocab.GLMVocabulary(extended)
  assert v.vocab_size == 1000 + len(vocab.SPECIAL_TOKENS)
  assert [v.special_ids.mask, v.special_ids.observation] == [1000, 1008]
  ids = v.tokenizer.encode("hello [gMASK]<sop> world")
  assert v.special_ids.gmask in ids and v.special_ids.sop in ids
  assert "added" in capsys.readouterr().out


def test_cli_encode_decode_info(capsys):
  assert tokenizer_cli.main(["encode", "Hello [MASK] 世界"]) == 0
  ids = json.loads(capsys.readouterr().out)
  assert vocab.special_ids().mask in ids
  assert tokenizer_cli.main(["decode", " ".join(map(str, ids))]) == 0
  assert capsys.readouterr().out == "Hello [MASK] 世界\n"
  assert tokenizer_cli.main(["info"]) == 0
  assert json.loads(capsys.readouterr().out)["special_ids"]["gmask"] == 5


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["add-specials", "--help"],
                                  ["encode", "--help"], ["decode", "--help"], ["info", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tokenizer_cli.main(argv)
  assert exit_info.value.code == 0
  assert "usage: glmjax tokenizer" in capsys.readouterr().out
