"""Export to PyTorch / HuggingFace and import from HuggingFace (DESIGN.md section 9).

    to_huggingface(params, config, out_dir)   # -> folder for AutoModelForCausalLM (or torch_model)
    from_huggingface(hf_dir)                  # -> (params, config)

`from_huggingface` also reads the GLM family's own checkpoints (glmjax.export.families:
ChatGLM2/3 / GLM-4, ChatGLM-6B, GLM-10B / GLM-Large, GLM-130B SwissArmyTransformer shards) from
safetensors, pytorch_model.bin (torch.load(weights_only=True)) or mp_rank_XX_model_states.pt;
`to_huggingface(..., target="chatglm")` writes ChatGLM2/3 / GLM-4's layout.
`glmjax export` / `glmjax import` (glmjax.cli) wrap them.
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


__all__ = ["from_huggingface", "to_huggingface"]
