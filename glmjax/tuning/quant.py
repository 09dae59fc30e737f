"""Weight-only quantization of the layer projections: NF4 (QLoRA) and per-channel int8.

NF4 (Dettmers et al. 2023, QLoRA, sec. 3): each weight tensor is flattened into blocks of 64;
a block is scaled by its absmax c2 into [-1, 1] and each value stored as the index (4 bits, two
per byte) of the nearest of the 16 NormalFloat levels q_i (eq. 4: quantiles of N(0, 1), with an
exact zero; the table below is bitsandbytes' NF4 map, rebuilt from its formula in the tests).
Double quantization (sec. 3, eq. 6): the block absmaxes c2 are themselves quantized: their mean
is subtracted and they are stored as int8 in blocks of 256 with one float32 scale c1 per block
(bitsandbytes stores this second level with its 8-bit dynamic map; a linear int8 map is used
here). Dequantization: W = q[idx] * (c2_int8 * c1 / 127 + mean(c2)).

int8 (LLM.int8() without outliers; GLM-130B's INT8 / INT4 are weight-only absmax per output
channel as well): w_int8 = round(127 w / s), s = max |w| over the input dims of each output
channel; W = w_int8 * s / 127.

A quantized weight is a pytree node (`QuantizedWeight`) in the place of the weight, with the
leading `layers` axis kept on every array so the layer scan slices it; its `dense()` runs inside
the scan (glmjax.model.layers.materialize), one layer at a time, so the float weights of the whole
model never exist at once. Under LoRA it is the frozen `LoraWeight.base` (QLoRA). Embeddings,
norms and the LM head stay float (as QLoRA and bitsandbytes leave them).

Why not qwix / aqtp: see glmjax/tuning/__init__.py (both intercept Flax modules; glmjax's model
is pure functions over dict params; neither has NF4 with double quantization).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.model.config import ModelConfig
from glmjax.tuning import lora as lora_lib

# bitsandbytes functional.py get_4bit_type("nf4"): the 16 NF4 levels, ascending.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044006, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
BLOCK = 64
SCALE_BLOCK = 256
KINDS = ("nf4", "int8")
CLI_KINDS = {"int8": "int8", "int4": "nf4"}  # glmjax generate --quantize


@dataclasses.dataclass
class QuantizedWeight:
  """A weight stored quantized. Arrays keep the leading axes `lead` of the original weight.

  nf4:  codes uint8 lead + (blocks, 32) (two indices per byte, low nibble first),
        absmax_q int8 lead + (scale_blocks, 256), absmax_scale f32 lead + (scale_blocks,),
        absmax_mean f32 lead.
  int8: codes int8 lead + shape, scale f32 lead + (1,)*in_ndim + out shape (absmax_* unused).
  weight_shape: the weight's shape after the leading axes; kind: "nf4" | "int8"."""
  codes: Any
  scale: Any
  absmax_q: Any
  absmax_mean: Any
  kind: str = "nf4"
  weight_shape: tuple = ()
  dtype: str = "float32"

  def dense(self):
    if self.kind == "int8":
      return (self.codes.astype(jnp.float32) * (self.scale / 127.0)).astype(self.dtype)
    return dequantize_nf4(self).astype(self.dtype)

  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in (self.codes, self.scale, self.absmax_q, self.absmax_mean) if x is not None)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["codes", "scale", "absmax_q", "absmax_mean"],
                                 meta_fields=["kind", "weight_shape", "dtype"])


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def _pad_to(x, multiple: int):
  """Pads the last axis of x with zeros to a multiple of `multiple`."""
  pad = (-x.shape[-1]) % multiple
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def quantize_nf4(w, lead: int) -> QuantizedWeight:
  """Blockwise-64 NF4 with double-quantized absmax (see the module docstring)."""
  w = jnp.asarray(w, jnp.float32)
  lead_shape, shape = w.shape[:lead], w.shape[lead:]
  flat = _pad_to(w.reshape(lead_shape + (-1,)), BLOCK)
  blocks = flat.reshape(lead_shape + (-1, BLOCK))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)  # c2, lead + (blocks,)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  levels = jnp.asarray(NF4_LEVELS).reshape((1,) * normed.ndim + (-1,))
  idx = jnp.argmin(jnp.abs(normed[..., None] - levels), axis=-1).astype(jnp.uint8)
  codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
  mean = jnp.mean(absmax, axis=-1)
  centred = _pad_to(absmax - mean[..., None], SCALE_BLOCK)
  centred = centred.reshape(lead_shape + (-1, SCALE_BLOCK))
  c1 = jnp.max(jnp.abs(centred), axis=-1)
  safe = jnp.where(c1 == 0, 1.0, c1)
  absmax_q = jnp.round(centred / safe[..., None] * 127.0).astype(jnp.int8)
  return QuantizedWeight(codes, c1, absmax_q, mean, "nf4", tuple(shape), str(w.dtype))


def dequantize_nf4(q: QuantizedWeight):
  lead_shape = q.codes.shape[:-2]
  nblocks = q.codes.shape[-2]
  absmax = (q.absmax_q.astype(jnp.float32) * (q.scale / 127.0)[..., None]).reshape(lead_shape + (-1,))
  absmax = absmax[..., :nblocks] + q.absmax_mean[..., None]
  idx = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1).reshape(lead_shape + (nblocks, BLOCK))
  values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)] * absmax[..., None]
  size = math.prod(q.weight_shape)
  return values.reshape(lead_shape + (-1,))[..., :size].reshape(lead_shape + tuple(q.weight_shape))


def quantize_int8(w, lead: int, in_ndim: int) -> QuantizedWeight:
  w = jnp.asarray(w, jnp.float32)
  in_axes = tuple(range(lead, lead + in_ndim))
  scale = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
  scale = jnp.where(scale == 0, 1.0, scale)
  codes = jnp.round(w / scale * 127.0).astype(jnp.int8)
  return QuantizedWeight(codes, scale, None, None, "int8", tuple(w.shape[lead:]), str(w.dtype))


def _lead(config: ModelConfig, name: str) -> int:
  return 2 if config.num_experts and name in ("w_up", "w_gate", "w_down") else 1


def quantize_projection(w, name: str, kind: str, lead: int) -> QuantizedWeight:
  """One stacked projection [layers, ...] quantized layer by layer (`lax.map` over the layers
  axis: the quantizer's temporaries, 16x the weight for NF4's nearest-level search, exist for one
  layer at a time). Blocks never cross layers, so this equals quantizing the stack at once."""
  def one(w_layer):
    w_layer = w_layer[None]
    q = quantize_nf4(w_layer, lead) if kind == "nf4" else quantize_int8(w_layer, lead, lora_lib.PROJECTIONS[name])
    return jax.tree.map(lambda x: x[0], q)
  return jax.lax.map(one, w)


def quantize_params(params: dict, config: ModelConfig, kind: str) -> dict:
  """Every layer projection (plain, or the base of a LoraWeight) quantized to `kind`; leaves
  already quantized are kept."""
  if kind not in KINDS:
    raise ValueError(f"quantize kind={kind!r} is not one of {KINDS}")

  def quantize(name, w):
    if is_quantized(w):
      return w
    return quantize_projection(w, name, kind, _lead(config, name))

  def visit(path, leaf):
    name = lora_lib._key_name(path[-1])  # pylint: disable=protected-access
    if lora_lib._key_name(path[0]) != "layers" or name not in lora_lib.PROJECTIONS:  # pylint: disable=protected-access
      return leaf
    if lora_lib.is_lora(leaf):
      return dataclasses.replace(leaf, base=quantize(name, leaf.base))
    return quantize(name, leaf)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: lora_lib.is_lora(x) or is_quantized(x))


def projection_bytes(params: dict) -> int:
  """Bytes of the layer projections as stored (quantized, or float arrays), adapters excluded."""
  total = 0
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: lora_lib.is_lora(x) or is_quantized(x))[0]
  for path, leaf in flat:
    if lora_lib._key_name(path[-1]) not in lora_lib.PROJECTIONS:  # pylint: disable=protected-access
      continue
    leaf = leaf.base if lora_lib.is_lora(leaf) else leaf
    total += leaf.nbytes() if is_quantized(leaf) else int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _is_projection(path) -> bool:
  return (lora_lib._key_name(path[0]) == "layers"  # pylint: disable=protected-access
          and lora_lib._key_name(path[-1]) in lora_lib.PROJECTIONS)  # pylint: disable=protected-access


def init_quantized_params(config: ModelConfig, rng: jax.Array, kind: str) -> dict:
  """A randomly initialised base with its layer projections born quantized, one layer at a time:
  layer l of a projection is drawn as spec.init(fold_in(key, l)) (key folded from the path as in
  init_params) and quantized inside a `lax.map`, so no layer stack of float weights exists. The
  draws are per layer, so this base is not init_params(config, rng) quantized; the QLoRA runs of
  one seed all get this same base (resume, load). Other leaves are init_params'."""
  from glmjax.model.params import _path_hash, is_spec, param_specs  # pylint: disable=import-outside-toplevel
  if kind not in KINDS:
    raise ValueError(f"quantize kind={kind!r} is not one of {KINDS}")

  def build(path, spec):
    key = jax.random.fold_in(rng, _path_hash(path))
    if not _is_projection(path):
      return spec.init(key, spec.shape, spec.dtype)
    name = lora_lib._key_name(path[-1])  # pylint: disable=protected-access
    lead = _lead(config, name)

    def one(layer):  # a unit layers axis keeps the initializer's fan axes where they are
      w = spec.init(jax.random.fold_in(key, layer), (1,) + tuple(spec.shape[1:]), spec.dtype)
      q = quantize_nf4(w, lead) if kind == "nf4" else quantize_int8(w, lead, lora_lib.PROJECTIONS[name])
      return jax.tree.map(lambda x: x[0], q)
    return jax.lax.map(one, jnp.arange(spec.shape[0], dtype=jnp.uint32))

  return jax.tree_util.tree_map_with_path(build, param_specs(config), is_leaf=is_spec)


def load_quantized_base(config: ModelConfig, checkpoints_dir: str, step: int, mesh, rules, kind: str) -> dict:
  """The params of a float checkpoint with the layer projections quantized, read one projection
  at a time: the float stack of one projection (and the quantizer's one-layer temporaries) is the
  most float weight held at once, never the whole float base."""
  import functools  # pylint: disable=import-outside-toplevel
  from glmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from glmjax.model.params import init_params  # pylint: disable=import-outside-toplevel
  from glmjax.run.load import restore_params  # pylint: disable=import-outside-toplevel
  shardings = shd.param_shardings(config, mesh, rules)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def nested(items):
    out = {}
    for path, value in items:
      node = out
      for entry in path[:-1]:
        node = node.setdefault(lora_lib._key_name(entry), {})  # pylint: disable=protected-access
      node[lora_lib._key_name(path[-1])] = value  # pylint: disable=protected-access
    return out

  rest = restore_params(checkpoints_dir, step, nested([(p, a) for p, a in flat if not _is_projection(p)]))
  done = {}
  for path, leaf in flat:
    if not _is_projection(path):
      continue
    name = lora_lib._key_name(path[-1])  # pylint: disable=protected-access
    w = restore_params(checkpoints_dir, step, nested([(path, leaf)]))
    for entry in path:
      w = w[lora_lib._key_name(entry)]  # pylint: disable=protected-access
    quantize = jax.jit(functools.partial(quantize_projection, name=name, kind=kind, lead=_lead(config, name)),
                       out_shardings=replicated)
    done[path] = quantize(w)
    del w
  full = {}
  for path, _ in flat:
    node, source = full, rest
    for entry in path[:-1]:
      key = lora_lib._key_name(entry)  # pylint: disable=protected-access
      node = node.setdefault(key, {})
      source = source.get(key, {}) if isinstance(source, dict) else {}
    key = lora_lib._key_name(path[-1])  # pylint: disable=protected-access
    node[key] = done[path] if path in done else source[key]
  return full
