"""glmjax.model.forward equals the slow NumPy reference for every architecture switch."""

import jax
import numpy as np
import pytest

from glmjax.model import forward
from tests.model import numpy_reference
from tests.model.helpers import as_jnp, as_numpy64, glm_batch, perturbed_params, tiny

CASES = {
    "glm-learned2d": ("tiny-glm", {}),
    "glm130b-deepnorm-geglu": ("tiny-glm130b", {}),
    "chatglm-rope2d": ("tiny-chatglm", {}),
    "chatglm2-partial-interleaved-gqa": ("tiny-chatglm2", {}),
    "llama-gqa": ("tiny-llama", {}),
    "palm-parallel-mqa": ("tiny-palm", {}),
    "neox-parallel-two-norms": ("tiny-palm", {"parallel_shared_norm": False, "num_kv_heads": 4}),
    "bloom-alibi-embednorm": ("tiny-bloom", {}),
    "bloom-alibi-12heads": ("tiny-bloom", {"num_heads": 12, "num_kv_heads": 12}),
    "gpt2-learned": ("tiny-gpt2", {}),
    "post-ln-relu": ("tiny-gpt2", {"norm_placement": "post", "ffn": "relu"}),
    "sandwich-reglu-sinusoidal": ("tiny-glm", {"norm_placement": "sandwich", "ffn": "reglu",
                                               "position": "sinusoidal"}),
    "partial-rotate-half": ("tiny-llama", {"rotary_fraction": 0.5, "rope_theta": 500.0}),
    "gelu-exact-untied": ("tiny-gpt2", {"ffn": "gelu", "tie_embeddings": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_numpy_reference(case):
  name, overrides = CASES[case]
  config = tiny(name, **overrides)
  params = perturbed_params(config)
  batch = glm_batch(config.vocab_size)
  got = np.asarray(jax.jit(forward, static_argnums=2)(params, as_jnp(batch), config))
  want = numpy_reference.forward(as_numpy64(params), batch, config)
  valid = batch["segment_ids"] != 0
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-4, rtol=1e-4)
