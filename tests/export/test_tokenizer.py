"""The exported tokenizer encodes and decodes exactly as the seqio vocabulary glmjax trains with."""

import io
import json

import pytest
import sentencepiece
import transformers

from glmjax.export import to_huggingface
from glmjax.export import tokenizer_files
from glmjax.model import ModelConfig
from glmjax.tasks import corpus
from glmjax.tasks.vocab import default_vocabulary
from tests.export import helpers

SAMPLES = [
    "Hello world, to be or not to be.", "[gMASK]<sop>Hello", "  two leading spaces\nnew line",
    "[MASK]x<|user|>hi<|assistant|>", "x [sMASK] y <eop>", "\n\nz", "a  b   c\n\n d", "",
    "trailing  ", "\t tab", "床前明月光，疑是地上霜。", "émoji 🙂 and bytes ©", "<|system|>\n规则",
]


def tiny_config(vocab_size: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=8, ffn_dim=32, max_length=64, norm="rmsnorm", ffn="swiglu")


def test_default_vocabulary_round_trips_through_transformers(tmp_path):
  vocab = default_vocabulary()
  config = tiny_config(vocab.vocab_size)
  to_huggingface(helpers.perturbed_params(config), config, str(tmp_path), tokenizer=vocab)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    hf_config = json.load(f)
  assert hf_config["eos_token_id"] == vocab.eos_id and hf_config["pad_token_id"] == vocab.pad_id

  texts = SAMPLES + [doc["text"] for source in corpus.SOURCES
                     for doc in corpus.load(source, "validation")[:60]]
  for text in texts:
    ids = [int(i) for i in vocab.encode(text)]
    assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert tokenizer.decode(ids) == vocab.decode(ids), text


def _train_sentencepiece(vocab_size=30, **options) -> bytes:
  model = io.BytesIO()
  lines = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"] * 20
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                           vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2,
                                           **options)
  return model.getvalue()


def test_unsupported_sentencepiece_models_are_refused(tmp_path):
  config = tiny_config(64)
  nfkc = _train_sentencepiece(model_type="bpe")  # default normalizer: nmt_nfkc
  with pytest.raises(ValueError, match="normalization 'nmt_nfkc'"):
    tokenizer_files.write(nfkc, str(tmp_path), config)
  unigram = _train_sentencepiece(model_type="unigram", normalization_rule_name="identity")
  with pytest.raises(ValueError, match="only BPE"):
    tokenizer_files.write(unigram, str(tmp_path), config)
  with pytest.raises(ValueError, match="ModelConfig.vocab_size=64"):
    tokenizer_files.write(default_vocabulary(), str(tmp_path), config)


def test_a_small_identity_bpe_model_is_exact(tmp_path):
  model = _train_sentencepiece(320, model_type="bpe", normalization_rule_name="identity",
                               byte_fallback=True, user_defined_symbols=["[MASK]"],
                               remove_extra_whitespaces=False)
  processor = sentencepiece.SentencePieceProcessor(model_proto=model)
  tokenizer_files.write(model, str(tmp_path), tiny_config(processor.GetPieceSize()))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in ["the lazy fox[MASK]jumps", "[MASK] box", "zebra über", "  dog  "]:
    ids = processor.EncodeAsIds(text)
    assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert tokenizer.decode(ids) == processor.DecodeIds(ids), text
