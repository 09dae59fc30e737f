"""`to_huggingface` never loses a file: bad arguments fail before out_dir is touched, a folder glmjax
did not write is refused, and a failure at any point leaves the earlier export byte-identical."""

import json
import os

import pytest

from glmjax.export import exporter, safetensors_io, to_huggingface
from glmjax.model import ModelConfig
from tests.export import helpers

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, ffn_dim=64, max_length=16, norm="rmsnorm", ffn="swiglu")
PARAMS = helpers.perturbed_params(CONFIG)
SHARDED = "20KB"  # several shards plus an index for CONFIG


def snapshot(folder) -> dict:
  """{name: bytes} of every file in `folder` (an export has no subfolders)."""
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def leftovers(tmp_path, name="out") -> list:
  """Siblings of tmp_path/name that the exporter made (temporary or set-aside folders)."""
  return [n for n in os.listdir(tmp_path) if n.startswith(name + ".glmjax-")]


@pytest.fixture
def earlier(tmp_path):
  """tmp_path/out holding a sharded glmjax export, and its bytes."""
  out = tmp_path / "out"
  to_huggingface(PARAMS, CONFIG, str(out), max_shard_size=SHARDED)
  assert safetensors_io.INDEX_FILE in os.listdir(out)
  return out, snapshot(out)


def test_manifest_lists_every_file_written(earlier):
  out, files = earlier
  manifest = json.loads(files[exporter.MANIFEST_FILE])
  assert manifest["format"] == exporter.MANIFEST_FORMAT and manifest["target"] == "llama"
  assert sorted(manifest["files"]) == sorted(set(files) - {exporter.MANIFEST_FILE})
  assert all(entry["size"] == len(files[name]) for name, entry in manifest["files"].items())


def test_a_folder_glmjax_did_not_write_is_refused_untouched(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "config.json").write_text("{}")
  with pytest.raises(ValueError) as error:
    to_huggingface(PARAMS, CONFIG, str(out))
  message = str(error.value)
  assert str(out) in message and "notes.txt" in message
  assert "choose an empty or new folder" in message and "overwrite=True" in message
  assert snapshot(out) == {"config.json": b"{}", "notes.txt": b"mine"}
  assert not leftovers(tmp_path)


def test_a_file_added_to_an_export_makes_it_foreign(earlier):
  out, files = earlier
  (out / "README.md").write_text("model card")
  with pytest.raises(ValueError, match="README.md"):
    to_huggingface(PARAMS, CONFIG, str(out))
  assert snapshot(out) == {**files, "README.md": b"model card"}


def test_a_file_changed_since_the_export_makes_it_foreign(earlier):
  out, files = earlier
  (out / "config.json").write_text(files["config.json"].decode() + " ")
  with pytest.raises(ValueError, match="config.json changed since glmjax export wrote it"):
    to_huggingface(PARAMS, CONFIG, str(out))
  assert (out / "config.json").read_bytes() == files["config.json"] + b" "


def test_bad_max_shard_size_fails_before_anything_is_written(tmp_path, earlier):
  out, files = earlier
  with pytest.raises(ValueError, match="max_shard_size='5XB'"):
    to_huggingface(PARAMS, CONFIG, str(out), max_shard_size="5XB")
  assert snapshot(out) == files
  with pytest.raises(ValueError, match="tokenizer .* does not exist"):
    to_huggingface(PARAMS, CONFIG, str(out), tokenizer=str(tmp_path / "no.model"))
  assert snapshot(out) == files and not leftovers(tmp_path)


def test_reexport_into_its_own_earlier_export_replaces_it_whole(tmp_path, earlier):
  out, files = earlier
  result = to_huggingface(PARAMS, CONFIG, str(out), target="torch")
  assert sorted(os.listdir(out)) == sorted(result.files)
  assert safetensors_io.INDEX_FILE not in result.files and "modeling_glmjax.py" in result.files
  assert not leftovers(tmp_path)


def test_a_failure_while_writing_shards_leaves_the_earlier_export(tmp_path, monkeypatch, earlier):
  out, files = earlier
  calls = []
  original = safetensors_io.write_file

  def fail_on_second_shard(filename, tensors, metadata):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError("disk full")
    original(filename, tensors, metadata)

  monkeypatch.setattr(safetensors_io, "write_file", fail_on_second_shard)
  with pytest.raises(OSError, match="disk full"):
    to_huggingface(PARAMS, CONFIG, str(out), max_shard_size="10KB")
  assert len(calls) == 2 and snapshot(out) == files and not leftovers(tmp_path)


def test_an_interrupt_while_writing_leaves_the_earlier_export(tmp_path, monkeypatch, earlier):
  out, files = earlier

  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(exporter.tokenizer_files, "write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    to_huggingface(PARAMS, CONFIG, str(out), tokenizer=b"unused")
  assert snapshot(out) == files and not leftovers(tmp_path)


def test_a_failed_swap_puts_the_earlier_export_back(tmp_path, monkeypatch, earlier):
  out, files = earlier
  rename = os.rename

  def refuse_new_into_place(src, dst):
    if ".glmjax-tmp-" in str(src):
      raise OSError("rename refused")
    rename(src, dst)

  monkeypatch.setattr(exporter.os, "rename", refuse_new_into_place)
  with pytest.raises(OSError, match="rename refused"):
    to_huggingface(PARAMS, CONFIG, str(out), target="torch")
  assert snapshot(out) == files and not leftovers(tmp_path)


def test_a_file_arriving_during_the_export_is_not_lost(tmp_path, monkeypatch, earlier):
  """The folder is checked again once set aside, right before the old one would be deleted."""
  out, files = earlier
  original = exporter.write_folder

  def write_then_someone_adds_a_file(*args):
    names = original(*args)
    (out / "late.txt").write_text("arrived")
    return names

  monkeypatch.setattr(exporter, "write_folder", write_then_someone_adds_a_file)
  with pytest.raises(ValueError, match="late.txt"):
    to_huggingface(PARAMS, CONFIG, str(out))
  assert snapshot(out) == {**files, "late.txt": b"arrived"} and not leftovers(tmp_path)


def test_overwrite_replaces_foreign_files_but_never_subfolders(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  result = to_huggingface(PARAMS, CONFIG, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == sorted(result.files)

  (out / "checkpoints").mkdir()
  (out / "checkpoints" / "0").write_text("state")
  with pytest.raises(ValueError, match=r"holds folders \(checkpoints\)"):
    to_huggingface(PARAMS, CONFIG, str(out), overwrite=True)
  assert (out / "checkpoints" / "0").read_text() == "state" and not leftovers(tmp_path)


def test_check_export_arguments_needs_no_params(tmp_path, earlier):
  out, _ = earlier
  assert exporter.check_export_arguments(str(out), max_shard_size="2KiB") == 2048
  assert exporter.check_export_arguments(str(tmp_path / "new")) == 5 * 10**9
  for kwargs, match in (({"target": "mistral"}, "unknown export target 'mistral'"),
                        ({"dtype": "int8"}, "dtype='int8'"),
                        ({"max_shard_size": "0"}, "max_shard_size='0'")):
    with pytest.raises(ValueError, match=match):
      exporter.check_export_arguments(str(out), **kwargs)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    exporter.check_export_arguments(str(tmp_path / "file"), overwrite=True)
  assert not os.path.exists(tmp_path / "new")
