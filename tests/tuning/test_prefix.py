"""P-Tuning v2: glmjax's prefix keys / values equal transformers' LLaMA given the same prefix as
`past_key_values` (ChatGLM-6B's ptuning mechanism); a step trains the prefix only."""

import functools

import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from glmjax.export import to_huggingface
from glmjax.model import forward
from glmjax.trainer import loss as loss_lib
from glmjax.tuning import prefix as prefix_lib
from glmjax.tuning.prefix import PrefixConfig
from tests.export.helpers import TOLERANCE, perturbed_params
from tests.train.helpers import random_batches, tiny_model

CONFIG = tiny_model()
P = 5


def _prefixed(seed=0):
  params = perturbed_params(CONFIG, seed=seed)
  return params, prefix_lib.apply_prefix(params, CONFIG, PrefixConfig(pre_seq_len=P, init_std=0.5),
                                         jax.random.PRNGKey(seed))


def test_prefix_equals_transformers_past_key_values(tmp_path):
  base, params = _prefixed()
  folder = str(tmp_path / "hf")
  to_huggingface(base, CONFIG, folder, target="llama")
  tokens = np.random.default_rng(0).integers(2, CONFIG.vocab_size, (2, 9)).astype(np.int32)
  batch = prefix_lib.with_prefix_rows({"tokens": tokens, "targets": tokens,
                                       "loss_mask": np.ones_like(tokens, np.float32)}, P)
  ours = np.asarray(forward(params, batch, CONFIG))[:, P:]

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  cache = transformers.DynamicCache()
  for layer in range(CONFIG.num_layers):
    k = np.asarray(params["layers"]["attn"]["prefix_k"][layer]).transpose(1, 0, 2)[None].repeat(2, 0)
    v = np.asarray(params["layers"]["attn"]["prefix_v"][layer]).transpose(1, 0, 2)[None].repeat(2, 0)
    cache.update(torch.tensor(k), torch.tensor(v), layer)
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long), past_key_values=cache,
                   attention_mask=torch.ones(2, P + 9, dtype=torch.long),
                   position_ids=torch.arange(9)[None].repeat(2, 1)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
  assert np.abs(ours - np.asarray(forward(base, {"tokens": tokens}, CONFIG))).max() > 1e-2


def test_a_step_trains_the_prefix_only():
  base, params = _prefixed(1)
  batch = prefix_lib.with_prefix_rows(random_batches(1, 4, 12, seed=1)[0], P)
  assert batch["tokens"].shape == (4, 12 + P) and not batch["loss_mask"][:, :P].any()

  def loss(p):
    sums = loss_lib.token_loss_sums(forward(p, batch, CONFIG), batch["targets"], batch["loss_mask"])
    return sums["nll_sum"] / sums["weight_sum"]

  optimizer = prefix_lib.freeze_base(optax.adam(3e-2))
  state = optimizer.init(params)

  @functools.partial(jax.jit, donate_argnums=())
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  new = params
  values = []
  for _ in range(4):
    new, state, value = step(new, state)
    values.append(float(value))
  assert values[-1] < values[0]
  flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
    name = str(getattr(path[-1], "key", ""))
    if name in prefix_lib.PREFIX_NAMES:
      assert np.any(np.asarray(leaf) != np.asarray(flat_old[path]))
    else:
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_old[path]))


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="PrefixConfig.pre_seq_len"):
    prefix_lib.prefix_specs(CONFIG, PrefixConfig(pre_seq_len=-2))
