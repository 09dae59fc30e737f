"""Chat with a ChatGLM2/3 tokenizer prompts exactly as ChatGLM3's own chat template.

The reference below is written from THUDM/chatglm3-6b tokenization_chatglm.py (`SPTokenizer`:
the special tokens after the SentencePiece pieces, `encode`, `decode`; `ChatGLMTokenizer`:
`get_prefix_tokens`, `build_single_message`, `build_chat_input`) and modeling_chatglm.py
(`chat`: the stop ids and the reply cut before the stop token; `process_response`), on
sentencepiece directly. transformers cannot be the reference here: it has no ChatGLMTokenizer
class, and `AutoTokenizer` on ChatGLM3's tokenizer_config.json needs the hub's remote
tokenization_chatglm.py (ValueError without trust_remote_code, OSError with it offline).
"""

import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from glmjax import cli
from glmjax.generate import chat as chat_lib
from glmjax.generate import glm
from glmjax.tasks import vocab
from tests.export import glm_family

LINES = ["You are a helpful assistant.\nAnswer briefly.", "calculator",
         "hello there, how are you today?", "I am fine, thank you.\nAnd you?",
         "what is two plus three", "the answer is five", "hi"]
SP_PIECES = 80  # + 9 specials = 89 ids, within the tiny checkpoint's padded_vocab_size 97
# tokenizer_config.json as THUDM/chatglm3-6b ships it (its fields that name the tokenizer).
CHATGLM3_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


class ReferenceChatGLM3:
  """ChatGLM3's SPTokenizer + ChatGLMTokenizer chat methods, on sentencepiece alone."""

  SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
              "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

  def __init__(self, model_file):
    self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
    self.n_words = self.sp.vocab_size()
    self.eos_id = self.sp.eos_id()
    self.special_tokens = {t: self.n_words + i for i, t in enumerate(self.SPECIALS)}
    self.index_special_tokens = {i: t for t, i in self.special_tokens.items()}

  def encode(self, s):
    return self.sp.encode(s)

  def decode(self, t):
    text, buffer = "", []
    for token in t:
      if token in self.index_special_tokens:
        if buffer:
          text += self.sp.decode(buffer)
          buffer = []
        text += self.index_special_tokens[token]
      else:
        buffer.append(token)
    if buffer:
      text += self.sp.decode(buffer)
    return text

  def build_single_message(self, role, metadata, message):
    return [self.special_tokens[f"<|{role}|>"]] + self.encode(f"{metadata}\n") + self.encode(message)

  def build_chat_input(self, query, history=(), role="user"):
    input_ids = []
    for item in history:
      input_ids += self.build_single_message(item["role"], item.get("metadata", ""), item["content"])
    input_ids += self.build_single_message(role, "", query)
    input_ids += [self.special_tokens["<|assistant|>"]]
    return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]] + input_ids

  def stop_ids(self):
    return [self.eos_id, self.special_tokens["<|user|>"], self.special_tokens["<|observation|>"]]

  @staticmethod
  def process_response(output, history):
    history = list(history)
    content = ""
    for response in output.split("<|assistant|>"):
      metadata, content = response.split("\n", maxsplit=1) if "\n" in response else ("", response)
      if not metadata.strip():
        content = content.strip()
      history.append({"role": "assistant", "metadata": metadata, "content": content})
    return content, history


def write_tokenizer(folder, config=CHATGLM3_TOKENIZER_CONFIG):
  os.makedirs(folder, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES * 4), model_writer=model, vocab_size=SP_PIECES, model_type="bpe",
      normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1,
      eos_id=2, pad_id=-1, required_chars="\n", minloglevel=2)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return write_tokenizer(tmp_path_factory.mktemp("chatglm3") / "tokenizer")


def as_turns(history):
  return [chat_lib.Turn(item["role"], item["content"], item.get("metadata", "")) for item in history]


HISTORY = [  # a system message, then two finished turns (the second assistant one a tool call)
    {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."},
    {"role": "user", "content": "hello there, how are you today?"},
    {"role": "assistant", "metadata": "", "content": "I am fine, thank you."},
    {"role": "user", "content": "what is two plus three"},
    {"role": "assistant", "metadata": "calculator", "content": " the answer is five\n"},
]


def test_prompt_ids_are_build_chat_input(tokenizer_dir):
  v = vocab.chatglm_tokenizer_in(tokenizer_dir)
  ref = ReferenceChatGLM3(os.path.join(tokenizer_dir, "tokenizer.model"))
  ids = v.special_ids
  assert isinstance(v, vocab.ChatGLMVocabulary) and chat_lib.is_chatglm3(ids)
  assert v.vocab_size == ref.n_words + 9 == SP_PIECES + 9
  assert (ids.mask, ids.gmask, ids.smask, ids.sop, ids.eop, ids.system, ids.user, ids.assistant,
          ids.observation) == tuple(ref.special_tokens[t] for t in ReferenceChatGLM3.SPECIALS)
  assert (ids.eos, ids.pad) == (ref.eos_id, ref.sp.unk_id())

  query = "And you?"
  turns = as_turns(HISTORY) + [chat_lib.Turn("user", query)]
  part_a, part_b = chat_lib.chat_prompt(turns, ids, v.encode)
  expected = ref.build_chat_input(query, HISTORY)
  assert part_a + part_b == expected
  assert ref.decode(expected).startswith("[gMASK]sop<|system|>\n You are")
  assert ref.decode(expected).endswith("<|user|>\n And you?<|assistant|>")
  # Under the causal layout the row is ChatGLM2/3's: positions 0..n-1, no bidirectional prefix.
  row = glm.glm_row(part_a, part_b, 0, glm.Convention("causal", ids.gmask))
  assert row["tokens"] == expected
  np.testing.assert_array_equal(row["positions"], np.arange(len(expected)))
  assert not any(row["bidirectional"]) and not any(row["block_positions"])
  assert list(chat_lib.stop_ids(ids)) == ref.stop_ids()
  # First turn (no history): "[gMASK]sop<|user|>\n <query><|assistant|>".
  part_a, part_b = chat_lib.chat_prompt([chat_lib.Turn("user", "hi")], ids, v.encode)
  assert part_a + part_b == ref.build_chat_input("hi")


def test_decode_and_reply_are_chatglm3s(tokenizer_dir):
  v = vocab.chatglm_tokenizer_in(tokenizer_dir)
  ref = ReferenceChatGLM3(os.path.join(tokenizer_dir, "tokenizer.model"))
  ids = v.special_ids
  rng = np.random.default_rng(0)
  for _ in range(20):  # ordinary ids, specials and eos mixed
    tokens = rng.integers(0, v.vocab_size, size=int(rng.integers(1, 30))).tolist()
    assert v.decode(tokens) == ref.decode(tokens), tokens
  assert v.decode(ref.build_chat_input("hi", HISTORY)) == ref.decode(ref.build_chat_input("hi", HISTORY))
  for reply in (v.encode("\nI am fine, thank you. "), v.encode("hi there"),
                v.encode("calculator\n two plus three\n"),
                v.encode("\nhello") + [ids.assistant] + v.encode("calculator\nfive")):
    text = v.decode(reply)
    content, history = ref.process_response(text, [])
    turns = chat_lib.reply_turns(text, ids)
    assert as_turns(history) == turns, text
    assert chat_lib.shown(turns[-1]) == content
  # A reply streams its content once the metadata line has ended.
  pieces = []
  stream = chat_lib.ReplyStream(pieces.append, ids)
  for piece in ("", "\n", " I am", " fine."):
    stream(piece)
  stream.finish("I am fine.")
  assert "".join(pieces) == "I am fine."


def test_tokenizer_folder_detection(tmp_path, tokenizer_dir):
  assert vocab.chatglm_tokenizer_in(tmp_path / "absent") is None
  other = write_tokenizer(tmp_path / "llama", {"tokenizer_class": "LlamaTokenizer"})
  assert vocab.chatglm_tokenizer_in(other) is None
  bad = write_tokenizer(tmp_path / "bad")
  with open(os.path.join(bad, "tokenizer_config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"bad/tokenizer_config.json is not valid JSON"):
    vocab.chatglm_tokenizer_in(bad)
  damaged = write_tokenizer(tmp_path / "damaged")
  with open(os.path.join(damaged, "tokenizer.model"), "wb") as f:
    f.write(b"not a sentencepiece model")
  with pytest.raises(ValueError, match=r"damaged/tokenizer.model is not a SentencePiece model"):
    vocab.chatglm_tokenizer_in(damaged)
  with pytest.raises(ValueError, match="needs prompt_layout 'causal', not 'glm'"):
    chat_lib.check_template(vocab.chatglm_tokenizer_in(tokenizer_dir).special_ids, glm.Convention("glm"))


def test_generate_chat_on_an_imported_chatglm3(tmp_path, monkeypatch, capsys):
  """glmjax import of a ChatGLM3-layout folder -> glmjax generate --mode chat --prompt hi
  --max_new_tokens 3 (plus a system message and a second turn): each prompt the model sees is
  build_chat_input of the conversation so far (the first reply processed as ChatGLM3 does),
  and the command exits 0."""
  config, sd = glm_family.chatglm2(rope_ratio=50.0)
  source = glm_family.save_safetensors(tmp_path / "chatglm3", config, sd)
  write_tokenizer(source)
  ref = ReferenceChatGLM3(os.path.join(source, "tokenizer.model"))
  run = str(tmp_path / "run")
  assert cli.main(["import", "--from", source, "--out", run]) == 0

  seen, real = [], glm.continue_glm

  def recording(params, config, part_as, part_bs, masks, options, **kwargs):
    result = real(params, config, part_as, part_bs, masks, options, **kwargs)
    seen.append((list(part_as[0]) + list(part_bs[0]), result.sequences()[0], options.stop_ids))
    return result

  monkeypatch.setattr(glm, "continue_glm", recording)
  capsys.readouterr()
  padded = ",".join(str(i) for i in range(ref.n_words + 9, config["padded_vocab_size"]))
  system = "You are a helpful assistant."
  assert cli.main(["generate", "--checkpoint", run, "--mode", "chat", "--prompt", "hi",
                   "--prompt", "what is two plus three", "--system", system,
                   "--max_new_tokens", "3", "--forbid", padded]) == 0
  out = capsys.readouterr().out
  assert "user: hi\nassistant: " in out and "user: what is two plus three\nassistant: " in out

  history = [{"role": "system", "content": system}]
  assert len(seen) == 2
  assert seen[0][0] == ref.build_chat_input("hi", history)
  assert set(ref.stop_ids()) <= set(seen[0][2])
  first_reply = list(seen[0][1])  # generated ids, the stop token cut as chat() cuts it
  history.append({"role": "user", "content": "hi"})
  _, history = ref.process_response(ref.decode(first_reply), history)
  assert seen[1][0] == ref.build_chat_input("what is two plus three", history)

