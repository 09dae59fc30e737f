"""Pure-functional GLM-family decoder (DESIGN.md section 2).

    config = presets.get("tiny-glm")
    params = init_params(config, jax.random.key(0))
    logits = forward(params, batch, config)   # [batch, length, vocab], float32
"""

from glmjax.model import batch, presets
from glmjax.model.config import ModelConfig, llama_ffn_dim
from glmjax.model.params import (ParamSpec, count_params, init_params, is_spec, logical_axes,
                                 param_specs)
from glmjax.model.transformer import forward, forward_with_aux

__all__ = ["ModelConfig", "ParamSpec", "batch", "count_params", "forward", "forward_with_aux",
           "init_params", "is_spec", "llama_ffn_dim", "logical_axes", "param_specs", "presets"]
