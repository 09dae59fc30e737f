"""glmjax.quiet: a default train stream in a fresh process writes nothing to stderr but real news."""

import os
import re
import subprocess
import sys

import pytest

from glmjax import quiet

NOISE = ("cuInit", "Could not find cuda drivers", "absl::InitializeLog", "uncached", "precompiled_charsmap")
# absl / Python logging ("INFO:absl:...") or C++ absl / TensorFlow logging ("I0000 00:00:...").
LOG_LINE = re.compile(r"^(INFO|WARNING|ERROR):|^[IWE]\d{4} ", re.MULTILINE)

SCRIPT = """
import sys
from glmjax.quiet import quiet_runtime
quiet_runtime(verbose={verbose})
assert "jax" not in sys.modules and "tensorflow" not in sys.modules, "quiet_runtime imported them"
from glmjax.trainer import data
batch = next(data.train_stream(data.DataConfig()))
print(sorted(batch))
"""


def _run(verbose: bool) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in quiet.QUIET_ENV}  # conftest sets some
  return subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose)], capture_output=True,
                        text=True, timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def quiet_run():
  return _run(verbose=False)


def test_default_train_stream_is_quiet(quiet_run):
  assert quiet_run.returncode == 0, quiet_run.stderr
  assert "tokens" in quiet_run.stdout
  heard = [n for n in NOISE if n in quiet_run.stderr]
  assert not heard, quiet_run.stderr
  assert not LOG_LINE.search(quiet_run.stderr), quiet_run.stderr


def test_verbose_keeps_the_logs():
  run = _run(verbose=True)
  assert run.returncode == 0, run.stderr
  assert LOG_LINE.search(run.stderr), run.stderr


def test_drop_lines_keeps_everything_else():
  text = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          b"a real error\n"
          b"E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
          b"no newline at the end")
  assert quiet.drop_lines(text, quiet.TF_IMPORT_NOISE) == b"a real error\nno newline at the end"


def test_filtered_stderr_writes_back_what_is_not_noise(capfd):
  with quiet.filtered_stderr(["noise"]):
    os.write(2, b"some noise\nnews\n")
    print("python news", file=sys.stderr)
  err = capfd.readouterr().err
  assert "news\n" in err and "python news\n" in err and "noise" not in err


def test_match_nothing_charsmap_tokenizes_like_identity_normalization():
  """The TF tokenizer's charsmap (no tensorflow-text log line) changes no id, even on odd bytes."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_text as tf_text  # pylint: disable=import-outside-toplevel
  from glmjax.tasks import vocab  # pylint: disable=import-outside-toplevel
  v = vocab.default_vocabulary()
  texts = ["To be, or not to be", "床前明月光，疑是地上霜。", "  two  spaces\n\ttab ", "[gMASK]<sop> x [MASK]",
           "ｆｕｌｌ　ｗｉｄｔｈ", "e\u0301 \ufeff \ufffd 🙂", ""]
  raw = [t.encode() for t in texts] + [b"a\x00b\x00\x00c", b"\xff\xfe abc \xc3", b"\x80", b"x\xed\xa0\x80y"]
  identity = tf_text.SentencepieceTokenizer(model=v.sp_model)
  expected = identity.tokenize(tf.constant(raw)).to_list()
  assert v.tf_tokenizer.tokenize(tf.constant(raw)).to_list() == expected
  assert expected[:len(texts)] == [v.tokenizer.encode(t) for t in texts]
  assert vocab.with_match_nothing_charsmap(v.sp_model) != v.sp_model
  patched = vocab.with_match_nothing_charsmap(v.sp_model)
  assert vocab.with_match_nothing_charsmap(patched) == patched  # a real charsmap is left alone
