"""The chat prompt is the training format (glmjax.tasks.formats.chat) cut before the answer."""

import numpy as np
import pytest
import tensorflow as tf

from glmjax.generate.chat import Turn, chat_prompt, stop_ids
from glmjax.generate.glm import glm_row
from glmjax.tasks import formats, vocab


def test_chat_prompt_is_the_training_example_up_to_the_answer():
  v = vocab.default_vocabulary()
  ids = vocab.special_ids(v)
  roles = ["system", "user", "assistant", "user", "assistant"]
  contents = ["You add numbers.", "What is 2 + 3?", "5", "And 10 + 7?", "17"]
  ds = tf.data.Dataset.from_tensors({"roles": tf.constant(roles), "contents": tf.constant(contents)})
  example = next(iter(formats.chat(ds).as_numpy_iterator()))

  history = [Turn(r, c) for r, c in zip(roles[:-1], contents[:-1])]
  part_a, part_b = chat_prompt(history, ids, lambda text: v.encode(text))
  row = glm_row(part_a, part_b, 0)
  n = len(row["tokens"])
  for key in ("tokens", "positions", "block_positions", "bidirectional"):
    np.testing.assert_array_equal(np.asarray(row[key]), example[key][:n], err_msg=key)
  # What follows in training is the answer, then the token the model learns to stop at.
  answer = v.encode("17")
  np.testing.assert_array_equal(example["targets"][n - 1:n - 1 + len(answer) + 1], answer + [ids.eop])
  assert ids.eop in stop_ids(ids) and ids.user in stop_ids(ids)


def test_prompt_layout_defaults_to_the_checkpoints_model_config():
  """generate / eval lay prompts out as the model family does unless a flag overrides it."""
  import argparse

  from glmjax.cli import common
  from glmjax.cli.generate import prompt_convention
  from glmjax.model import presets
  from glmjax.trainer.data import DataConfig

  no_flags = argparse.Namespace(prompt_layout=None, causal_inputs=None, positions_1d=None)
  expected = {"tiny-glm": "glm", "tiny-chatglm": "glm", "tiny-glm130b": "glm130b",
              "tiny-chatglm2": "causal", "tiny-llama": "causal"}
  for name, layout in expected.items():
    assert prompt_convention(no_flags, presets.get(name), DataConfig()).prompt_layout == layout
  glm = prompt_convention(no_flags, presets.get("tiny-glm"), DataConfig())
  assert glm.bidirectional_inputs and not glm.positions_1d
  llama = prompt_convention(no_flags, presets.get("tiny-llama"))
  assert not llama.bidirectional_inputs and llama.positions_1d
  forced = prompt_convention(argparse.Namespace(prompt_layout=None, causal_inputs=True, positions_1d=None),
                             presets.get("tiny-glm"), DataConfig())
  assert forced.prompt_layout == "causal"
  named = prompt_convention(argparse.Namespace(prompt_layout="glm130b", causal_inputs=None, positions_1d=None),
                            presets.get("tiny-llama"))
  assert named.prompt_layout == "glm130b"
  with pytest.raises(common.BadInput, match="DataConfig.positions_1d=False conflicts with "
                                            "ModelConfig.prompt_layout='causal'"):
    prompt_convention(no_flags, presets.get("tiny-chatglm2"), DataConfig(positions_1d=False))


def test_cli_convention_takes_cls_from_a_glm_vocabulary(tmp_path):
  """A GLM-10B checkpoint whose vocabulary has [CLS] is prompted [CLS] ... eos (GLM's
  generate_samples.py); the shipped vocabulary has no [CLS], so nothing is added."""
  import argparse

  from sentencepiece import sentencepiece_model_pb2

  from glmjax.cli.generate import prompt_convention
  from glmjax.model import presets

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(vocab.default_vocabulary().sp_model)
  proto.pieces.add(piece="[CLS]", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  (tmp_path / "glm.model").write_bytes(proto.SerializeToString())
  glm_vocab = vocab.GLMVocabulary(str(tmp_path / "glm.model"))
  no_flags = argparse.Namespace(prompt_layout=None, causal_inputs=None, positions_1d=None)
  ids = glm_vocab.special_ids
  with_cls = prompt_convention(no_flags, presets.get("glm-10b"), None, glm_vocab)
  assert with_cls.prompt([20, ids.mask, 21]) == [glm_vocab.tokenizer.piece_to_id("[CLS]"), 20, ids.mask, 21,
                                                 ids.eos]
  shipped = prompt_convention(no_flags, presets.get("glm-10b"), None, vocab.default_vocabulary())
  assert shipped.cls_id is None and shipped.prompt([20, ids.mask, 21]) == [20, ids.mask, 21]
