"""Export to PyTorch / HuggingFace and import from HuggingFace (DESIGN.md section 9).

    to_huggingface(params, config, out_dir)   # -> folder for AutoModelForCausalLM (or torch_model)
    from_huggingface(hf_dir)                  # -> (params, config)

`glmjax export` / `glmjax import` wrap them (see `main` and `importer.main`).
Nothing here imports jax at module level, so `glmjax.export.torch_model` can be
used where only torch is installed.
"""

from __future__ import annotations


def to_huggingface(params, config, out_dir, *, tokenizer=None, **kwargs):
  """See glmjax.export.exporter.to_huggingface (contract)."""
  from glmjax.export import exporter  # pylint: disable=import-outside-toplevel
  return exporter.to_huggingface(params, config, out_dir, tokenizer=tokenizer, **kwargs)


def from_huggingface(hf_dir, **kwargs):
  """See glmjax.export.importer.from_huggingface (contract): returns (params, config)."""
  from glmjax.export import importer  # pylint: disable=import-outside-toplevel
  return importer.from_huggingface(hf_dir, **kwargs)


def main(argv=None) -> int:
  """`glmjax export --checkpoint DIR [--step N] --out OUT`."""
  from glmjax.export import export_cli  # pylint: disable=import-outside-toplevel
  return export_cli.main(argv)


__all__ = ["from_huggingface", "main", "to_huggingface"]
