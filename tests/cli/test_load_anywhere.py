"""Train anywhere, load anywhere: a run trained on an 8-device fsdp x tensor mesh decodes,
evaluates and exports on one device with the same tokens and logits, restoring params only."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from glmjax.run import load as workdir_lib
from glmjax.generate import GenerationOptions, glm
from glmjax.model import forward
from tests.cli.conftest import run_cli
from tests.sharding.test_distributed import REPO

PROMPT = "To be, or not to be, that is the [MASK]."


@pytest.fixture(scope="module")
def loaded_8_and_1(trained_run):
  on_8 = workdir_lib.load_params(trained_run)
  on_1 = workdir_lib.load_params(trained_run, devices=jax.devices()[:1])
  return on_8, on_1


def test_params_only_restore_places_params_on_the_devices_given(loaded_8_and_1):
  on_8, on_1 = loaded_8_and_1
  assert on_8.step == on_1.step == 4
  assert len(on_8.mesh.devices.flat) == 8 and dict(on_8.mesh.shape)["fsdp"] == 4
  assert len(on_1.mesh.devices.flat) == 1
  assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(on_8.params))
  assert set(on_8.params) == {"embed", "layers", "final_norm"} | ({"lm_head"} & set(on_8.params))
  for a, b in zip(jax.tree_util.tree_leaves(on_8.params), jax.tree_util.tree_leaves(on_1.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_logits_and_tokens_on_one_device(loaded_8_and_1):
  on_8, on_1 = loaded_8_and_1
  from glmjax.tasks import vocab as vocab_lib
  v = vocab_lib.default_vocabulary()
  ids = v.special_ids
  text = list(v.encode(PROMPT))
  rows = [glm.glm_row(text, [ids.sop], text.index(ids.mask), glm.GLM)]
  batch = {k: np.asarray([r[k] for r in rows], np.int32) for k in rows[0]}
  batch = scoring_batch(batch)
  with on_8.sharding_context():
    logits_8 = np.asarray(jax.jit(forward, static_argnums=2)(on_8.params, batch, on_8.config))
  with on_1.sharding_context():
    logits_1 = np.asarray(jax.jit(forward, static_argnums=2)(on_1.params, batch, on_1.config))
  np.testing.assert_allclose(logits_1, logits_8, atol=2e-5, rtol=1e-5)

  options = GenerationOptions(max_new_tokens=8)
  fills = []
  for loaded in (on_8, on_1):
    with loaded.sharding_context():
      fills.append(glm.fill_blanks(loaded.params, loaded.config, [text] * loaded.batch_multiple,
                                   mask_ids=(ids.mask, ids.smask, ids.gmask), sop_id=ids.sop,
                                   eop_id=ids.eop, options=options)[0])
  assert fills[0].spans == fills[1].spans


def scoring_batch(row):
  from glmjax.model.batch import with_defaults
  return with_defaults(row)


def test_generate_eval_export_commands_on_a_one_device_host(trained_run, tmp_path):
  """The commands themselves in a process with one CPU device: same text as on 8 devices, the
  same eval numbers, byte-identical exported weights; and stderr free of TF / absl noise."""
  out_8 = tmp_path / "hf8"
  assert run_cli(["export", "--checkpoint", trained_run, "--out", str(out_8), "--target", "torch"]) == 0
  eval_8 = tmp_path / "eval8.json"
  assert run_cli(["eval", "--checkpoint", trained_run, "--tasks", "glmjax_corpus_en_blank_infilling",
                  "--lm_batches", "1", "--unigram_batches", "1", "--batch_size", "8",
                  "--output", str(eval_8)]) == 0

  script = tmp_path / "one_device.sh"
  out_1, eval_1 = tmp_path / "hf1", tmp_path / "eval1.json"
  script.write_text(
      f"set -e\n"
      f"glmjax generate --checkpoint {trained_run} --prompt '{PROMPT}' --max_new_tokens 8 --no_stream --strategy greedy\n"
      f"glmjax eval --checkpoint {trained_run} --tasks glmjax_corpus_en_blank_infilling --lm_batches 1 "
      f"--unigram_batches 1 --batch_size 8 --output {eval_1} > /dev/null\n"
      f"glmjax export --checkpoint {trained_run} --out {out_1} --target torch > /dev/null\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("cuInit", "Could not find cuda drivers", "absl::InitializeLog", "uncached",
                "precompiled_charsmap", "Traceback", "WARNING"):
    assert noise not in proc.stderr, (noise, proc.stderr[-2000:])

  answer_8 = _generate_in_process(trained_run)
  assert answer_8 in proc.stdout
  results_8, results_1 = json.loads(eval_8.read_text()), json.loads(eval_1.read_text())
  task = "glmjax_corpus_en_blank_infilling"
  numbers = {k: v for k, v in results_8["tasks"][task].items() if isinstance(v, (int, float))}
  assert numbers
  for key, value in numbers.items():
    assert results_1["tasks"][task][key] == pytest.approx(value, rel=1e-6, abs=1e-5), key
  weights = sorted(n for n in os.listdir(out_8) if n.endswith(".safetensors"))
  assert weights and weights == sorted(n for n in os.listdir(out_1) if n.endswith(".safetensors"))
  for name in weights:
    assert (out_8 / name).read_bytes() == (out_1 / name).read_bytes()


def _generate_in_process(trained_run):
  import contextlib
  import io
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    assert run_cli(["generate", "--checkpoint", trained_run, "--prompt", PROMPT,
                    "--max_new_tokens", "8", "--no_stream", "--strategy", "greedy"]) == 0
  return buffer.getvalue().strip()
