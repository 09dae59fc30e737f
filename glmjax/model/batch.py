"""The batch contract (DESIGN.md section 2) in one place.

    host = to_host_batch(example)          # contract keys, dtypes and defaults, numpy
    check_ids(host, model_config)          # ids the model would gather out of range fail here
    mask = may_attend(seg[:, :, None], seg[:, None, :], bidi[:, None, :],
                      idx[:, None], idx[None, :])   # the attention rule, any array namespace

A batch is a dict of [batch, length] arrays: `tokens`, `targets`,
`loss_mask` (float32) and the optional packing / GLM fields `segment_ids`,
`positions`, `block_positions`, `bidirectional` (int32). This module imports
only numpy; the attention rule and token accuracy are written with operators
that jax.numpy, numpy and torch share, so the model, the kernels, the trainer
and evaluation all read one definition.
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "block_positions",
              "bidirectional")
FLOAT_KEYS = frozenset({"loss_mask"})
REQUIRED_KEYS = ("tokens", "targets", "loss_mask")
OPTIONAL_KEYS = ("segment_ids", "positions", "block_positions", "bidirectional")


def dtype_of(key: str):
  """The contract dtype of `key`: float32 for `loss_mask`, int32 for every other key."""
  return np.float32 if key in FLOAT_KEYS else np.int32


def default_field(key: str, shape, xp=np):
  """The value an absent optional field takes, in array namespace `xp` (numpy or jax.numpy).

  The defaults describe one unpacked causal row per batch row: a single
  segment (ones), positions 0..L-1, no GLM Part B (zero block positions) and no
  bidirectional tokens.
  """
  if key == "segment_ids":
    return xp.ones(shape, xp.int32)
  if key == "positions":
    return xp.broadcast_to(xp.arange(shape[-1], dtype=xp.int32), shape)
  if key in ("block_positions", "bidirectional"):
    return xp.zeros(shape, xp.int32)
  raise KeyError(f"{key!r} has no default; optional batch keys are {OPTIONAL_KEYS}")


def with_defaults(batch: dict, xp=np) -> dict:
  """A copy of `batch` with every absent optional field filled by `default_field`."""
  shape = tuple(batch["tokens"].shape)
  out = dict(batch)
  for key in OPTIONAL_KEYS:
    if key not in out:
      out[key] = default_field(key, shape, xp)
  return out


def to_host_batch(example: dict) -> dict:
  """A training batch in the contract, numpy: every key of BATCH_KEYS in its dtype.

  `tokens`, `targets` and `loss_mask` are required; absent optional fields
  get their defaults (plain causal LM on unpacked rows). Other keys are dropped.
  """
  missing = [k for k in REQUIRED_KEYS if k not in example]
  if missing:
    raise ValueError(f"batch misses {missing}; it has {sorted(example)} (DESIGN.md section 2 contract)")
  shape = np.shape(example["tokens"])
  return {key: (np.asarray(example[key], dtype_of(key)) if key in example
                else np.array(default_field(key, shape, np)))
          for key in BATCH_KEYS}


def check_ids(batch: dict, model_config) -> None:
  """Ids the model would gather out of range fail here, on the host: the jitted
  embedding gather would silently clamp token ids and turn position ids past a
  learned table into NaN (DESIGN.md section 7)."""
  model = model_config
  ranges = [("tokens", model.vocab_size, "ModelConfig.vocab_size",
             "set vocab_size to the data's vocabulary size (8192 for glmjax.tasks' default)"),
            ("targets", model.vocab_size, "ModelConfig.vocab_size",
             "set vocab_size to the data's vocabulary size (8192 for glmjax.tasks' default)")]
  if model.uses_learned_positions:
    fix = ("raise ModelConfig.max_length above DataConfig.sequence_length (GLM block positions "
           "reach the span length + 1) or shorten the sequences")
    ranges.append(("positions", model.position_table_rows, "ModelConfig.max_length", fix))
    if model.position == "learned_2d":
      ranges.append(("block_positions", model.position_table_rows, "ModelConfig.max_length", fix))
  for key, limit, field, fix in ranges:
    if key not in batch:
      continue
    low, high = int(batch[key].min()), int(batch[key].max())
    if low < 0 or high >= limit:
      value = getattr(model, field.split(".")[1])
      raise ValueError(f"batch[{key!r}] has ids in [{low}, {high}], outside [0, {limit}) "
                       f"({field}={value}); {fix}")


def may_attend(q_segment_ids, k_segment_ids, k_bidirectional, q_index, k_index):
  """The attention rule of DESIGN.md section 2, elementwise with broadcasting.

  Query row i may attend key j iff
  `segment_ids[i] == segment_ids[j] != 0 and (j <= i or bidirectional[j])`.
  Query-side arguments broadcast against key-side ones, e.g. [b, lq, 1] with
  [b, 1, lk], or a kernel tile's [bq, 1] column with its [1, bk] row. `q_index`
  / `k_index` are row indices in the packed row (cache slots when decoding),
  never `positions`: GLM Part B positions repeat, causality follows the row.

  Only `==`, `!=`, `<=`, `&` and `|` are used, so the same function runs on
  jax.numpy and numpy arrays, torch tensors and values inside Pallas kernels.
  """
  same_segment = (q_segment_ids == k_segment_ids) & (k_segment_ids != 0)
  return same_segment & ((k_index <= q_index) | (k_bidirectional != 0))


def target_is_argmax(logits, targets):
  """Token accuracy: whether `targets` [...] is the argmax of `logits` [..., vocab] (bool [...]).

  Ties go to the lowest vocabulary id (`argmax` returns the first maximum in
  jax.numpy, numpy and torch), so a target tied with a smaller id counts as
  wrong. The trainer's `correct_sum` and evaluation's accuracy both use this.
  """
  return logits.argmax(-1) == targets
