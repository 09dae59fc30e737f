"""Bad GLM-family checkpoints: each a one-line ValueError naming the file / field and the fix (the
CLI's exit 2), never a traceback from deep inside the import."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from glmjax import cli
from glmjax.export import from_huggingface
from tests.export import glm_family


def one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)
  return str(excinfo.value)


def test_missing_config_field_is_named(tmp_path):
  config, sd = glm_family.chatglm2()
  del config["kv_channels"]
  folder = glm_family.save_safetensors(tmp_path / "c", config, sd)
  with pytest.raises(ValueError, match=r"config.json: field 'kv_channels' is missing") as e:
    from_huggingface(folder)
  one_line(e)


def test_shard_in_index_but_absent(tmp_path):
  config, sd = glm_family.chatglm6b()
  folder = glm_family.save_bin(tmp_path / "c", config, sd, shards=3)
  os.remove(os.path.join(folder, "pytorch_model-00002-of-00003.bin"))
  with pytest.raises(ValueError, match=r"pytorch_model-00002-of-00003.bin is missing: .*"
                     r"pytorch_model.bin.index.json lists it") as e:
    from_huggingface(folder)
  one_line(e)


def test_tensor_parallel_counts_that_do_not_divide(tmp_path):
  config, sd = glm_family.glm130b(heads=8)
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, tp=4)
  with open(os.path.join(folder, "model_config.json"), "w") as f:
    json.dump(dict(config, num_attention_heads=6, hidden_size=30, model_parallel_size=4), f)
  with pytest.raises(ValueError, match=r"model_config.json: num_attention_heads=6 does not divide "
                     r"into the 4 tensor-parallel shards") as e:
    from_huggingface(folder)
  one_line(e)


def test_missing_tensor_parallel_shard(tmp_path):
  config, sd = glm_family.glm130b()
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, tp=4)
  os.remove(os.path.join(folder, "1000", "mp_rank_02_model_states.pt"))
  with pytest.raises(ValueError, match=r"lacks mp_rank_02_model_states.pt of the 4"):
    from_huggingface(folder)
  os.remove(os.path.join(folder, "1000", "mp_rank_03_model_states.pt"))  # the last one too
  with pytest.raises(ValueError, match=r"model_parallel_size=4 but .* holds 2 mp_rank_XX"):
    from_huggingface(folder)


def test_quantized_sat_checkpoint_is_refused(tmp_path):
  config, sd = glm_family.glm130b()
  sd["transformer.layers.0.attention.dense.weight_scale"] = np.ones(32, np.float16)
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, tp=1)
  with pytest.raises(ValueError, match=r"holds quantized weights .*import the float16 checkpoint"):
    from_huggingface(folder)


def test_shape_that_does_not_match_the_config(tmp_path):
  config, sd = glm_family.glm_block()
  folder = glm_family.save_bin(tmp_path / "g", dict(config, vocab_size=96), sd)
  with pytest.raises(ValueError, match=r"glm.word_embeddings.weight has shape \(97, 32\), the config "
                     r"implies \(96, 32\)") as e:
    from_huggingface(folder)
  one_line(e)


def test_sat_folder_without_model_config(tmp_path):
  config, sd = glm_family.glm130b()
  folder = glm_family.save_sat(tmp_path / "sat", config, sd, tp=2)
  os.remove(os.path.join(folder, "model_config.json"))
  with pytest.raises(FileNotFoundError, match=r"model_config.json is missing.*\"model_class\": "
                     r"\"GLM130B\", \"num_layers\": 70"):
    from_huggingface(folder)


class Payload:  # pickled by reference: torch.load(weights_only=True) must refuse it
  def __reduce__(self):
    return (print, ("this must never run",))


def test_pickles_beyond_plain_tensors_are_refused(tmp_path, capsys):
  config, sd = glm_family.chatglm6b()
  folder = glm_family.save_bin(tmp_path / "c", config, sd)
  state = {k: torch.from_numpy(v) for k, v in sd.items()}
  state["extra"] = Payload()
  torch.save(state, os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(ValueError, match=r"pytorch_model.bin holds objects beyond tensors and plain "
                     r"containers .*torch.load\(weights_only=True\)") as e:
    from_huggingface(folder)
  one_line(e)
  assert "must never run" not in capsys.readouterr().out


def test_other_pickle_files_are_not_read(tmp_path):
  config, sd = glm_family.chatglm6b()
  glm_family.write_config(tmp_path, config)
  with open(tmp_path / "weights.pt", "wb") as f:
    pickle.dump({"x": np.zeros(3)}, f)
  with pytest.raises(FileNotFoundError, match=r"weights.pt are not read"):
    from_huggingface(str(tmp_path))


def test_cli_exit_2_on_bad_family_checkpoint(tmp_path, capsys):
  config, sd = glm_family.chatglm2()
  del config["seq_length"]
  folder = glm_family.save_safetensors(tmp_path / "c", config, sd)
  assert cli.main(["import", "--from", folder, "--out", str(tmp_path / "run")]) == 2
  assert "field 'seq_length' is missing" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["chatglm6b", "glm_block", "glm130b_sat"])
def test_cli_imports_each_family_into_a_run_directory(family, tmp_path):
  """`glmjax import --from FOLDER --out RUN`: exit 0, and RUN/model.gin names the family's layout."""
  if family == "chatglm6b":
    folder = glm_family.save_bin(tmp_path / "src", *glm_family.chatglm6b())
    with open(os.path.join(folder, "ice_text.model"), "wb") as f:
      f.write(b"ChatGLM-6B's SentencePiece model")
    layout = "glm"
  elif family == "glm_block":
    folder, layout = glm_family.save_bin(tmp_path / "src", *glm_family.glm_block()), "glm"
  else:
    folder, layout = glm_family.save_sat(tmp_path / "src", *glm_family.glm130b(), tp=4), "glm130b"
  run = str(tmp_path / "run")
  assert cli.main(["import", "--from", folder, "--out", run]) == 0
  with open(os.path.join(run, "model.gin")) as f:
    assert f"ModelConfig.prompt_layout = '{layout}'" in f.read()
  if family == "chatglm6b":
    assert os.path.exists(os.path.join(run, "tokenizer", "ice_text.model"))
