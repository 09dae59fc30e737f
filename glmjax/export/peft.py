"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapters(lora_params, config, "runs/x-adapter", lora_dropout=lora.dropout)  # PeftModel loads it
    lora_config, lora_params = load_adapters("dir", base_params, config)

PEFT's LoRA layer computes y = W x + (lora_alpha / r) lora_B(lora_A(x)), with torch.nn.Linear
weights lora_A [r, in] and lora_B [out, r] on the modules of the HF class (`q_proj`, ...). The
module of each glmjax projection and its layout come from the HF export target's table
(glmjax.export.targets): a projection written as one Linear of its own (LLaMA's q/k/v/o and MLP
projections) has glmjax A [in..., r] -> lora_A = A^T (input dims flattened like the weight's),
B [r, out...] -> lora_B = B^T, with the target's RoPE layout permutation on the q / k output dims.
Every exported pair is checked against the target's own weight conversion of A B (the merged
delta), so a layout this module does not know is refused, not written wrong. A projection fused
with others in the target (GLM-4's gate_up_proj, GPT-NeoX's query_key_value) has no rank-r PEFT
equivalent of separate adapters and is refused with the LoraConfig.targets to drop.

Keys are PEFT's saved names, `base_model.model.<module>.lora_A.weight` (no adapter name).
`lora_dropout` (LoraConfig.dropout: PEFT's dropout on the adapter input, train mode only) is not
in the weights; save_adapters writes the rate it is given into adapter_config.json and
load_adapters reads it back into the LoraConfig it returns.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from glmjax.export import targets as targets_lib
from glmjax.model.config import ModelConfig
from glmjax.tuning import lora as lora_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def projection_maps(config: ModelConfig, target: targets_lib.Target) -> tuple[dict, set]:
  """({(projection, layer): TensorMap} for projections written as one Linear, {fused names})."""
  single, fused = {}, set()
  for tm in target.tensors(config):
    names = [path[-1] for path in tm.sources if path[-1] in lora_lib.PROJECTIONS]
    if tm.layer is None or not names or not tm.name.endswith(".weight"):
      continue
    if len(tm.sources) == 1:
      single[(names[0], tm.layer)] = tm
    else:
      fused.update(names)
  return single, fused


def _perm(name: str, config: ModelConfig, target: targets_lib.Target):
  if name not in ("wq", "wk") or not hasattr(target, "layout"):
    return None
  return targets_lib.layout_permutation(config.head_dim, config.rotary_dim, config.rope_layout,
                                        target.layout)


def to_peft(name: str, a: np.ndarray, b: np.ndarray, perm) -> tuple[np.ndarray, np.ndarray]:
  """One layer's glmjax (A [in..., r], B [r, out...]) -> PEFT (lora_A [r, in], lora_B [out, r])."""
  r = a.shape[-1]
  if perm is not None:
    b = b[..., perm]
  return a.reshape(-1, r).T, b.reshape(r, -1).T


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape: tuple, b_shape: tuple, perm):
  """Inverse of to_peft for one layer."""
  a = lora_a.T.reshape(a_shape)
  b = lora_b.T.reshape(b_shape)
  if perm is not None:
    b = b[..., np.argsort(perm)]
  return a, b


def _check_against_target(tm, name, a, b, lora_a, lora_b):
  expected = np.asarray(tm.to_hf(np.tensordot(a, b, axes=1)))
  got = lora_b @ lora_a
  if expected.shape != got.shape or not np.allclose(expected, got, rtol=1e-5, atol=1e-6):
    raise ValueError(f"PEFT export: {tm.name} is not a plain Linear of glmjax {name!r} in this target; "
                     "drop it from LoraConfig.targets")


def _lora_leaves(params: dict) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lora_lib.is_lora)[0]:
    if lora_lib.is_lora(leaf):
      out[lora_lib._key_name(path[-1])] = leaf  # pylint: disable=protected-access
  return out


def adapter_config(rank: int, alpha: float, modules: list, base: Optional[str],
                   lora_dropout: float = 0.0) -> dict:
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
          "lora_dropout": lora_dropout, "target_modules": sorted(modules), "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
          "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
          "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base}


def save_adapters(params: dict, config: ModelConfig, out_dir: str, *, target: str = "auto",
                  base_model_name_or_path: Optional[str] = None, lora_dropout: float = 0.0) -> list[str]:
  """Writes the LoraWeight adapters of `params` as a PEFT LoRA adapter folder (`lora_dropout`:
  the run's LoraConfig.dropout, written to adapter_config.json); returns the file names."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if isinstance(lora_dropout, bool) or not (isinstance(lora_dropout, (int, float))
                                            and 0.0 <= lora_dropout < 1.0):
    raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1) (LoraConfig.dropout)")
  chosen = targets_lib.select(config, target)
  single, fused = projection_maps(config, chosen)
  leaves = {k: jax.device_get(v) for k, v in _lora_leaves(params).items()}
  if not leaves:
    raise ValueError("params hold no LoRA adapters (LoraConfig.rank=0?); nothing to export")
  bad = sorted(set(leaves) & fused)
  if bad:
    raise ValueError(f"LoraConfig.targets: {bad} are fused with other weights in {chosen.architecture} "
                     "(one Linear for several glmjax weights); PEFT cannot hold separate adapters for them")
  scales = {leaf.scale for leaf in leaves.values()}
  ranks = {leaf.a.shape[-1] for leaf in leaves.values()}
  if len(scales) != 1 or len(ranks) != 1:
    raise ValueError(f"adapters have several ranks {sorted(ranks)} / scales {sorted(scales)}; PEFT "
                     "export writes one r and lora_alpha")
  rank, scale = ranks.pop(), scales.pop()
  tensors, modules = {}, set()
  for name, leaf in sorted(leaves.items()):
    if leaf.a.ndim != leaf.in_ndim + 2:
      raise ValueError(f"PEFT export: adapters of {name!r} have expert axes (MoE); not supported")
    perm = _perm(name, config, chosen)
    for layer in range(config.num_layers):
      tm = single[(name, layer)]
      a, b = np.asarray(leaf.a[layer], np.float32), np.asarray(leaf.b[layer], np.float32)
      lora_a, lora_b = to_peft(name, a, b, perm)
      _check_against_target(tm, name, a, b, lora_a, lora_b)
      module = tm.name[:-len(".weight")]
      tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
      tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
      modules.add(module.rsplit(".", 1)[-1])
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(adapter_config(rank, float(scale * rank), sorted(modules), base_model_name_or_path,
                             float(lora_dropout)), f, indent=2)
  return [CONFIG_FILE, WEIGHTS_FILE]


def _read_config(adapter_dir: str) -> dict:
  path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: no {CONFIG_FILE}; not a PEFT adapter folder")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters import")
  for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
    if cfg.get(field):
      raise ValueError(f"{path}: {field}=true is not supported (plain LoRA only)")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      raise ValueError(f"{path}: {field} (per-module ranks) is not supported")
  if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
    raise ValueError(f"{path}: bias / modules_to_save train base weights; only adapters import")
  dropout = cfg.get("lora_dropout") or 0.0
  if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
    raise ValueError(f"{path}: lora_dropout={cfg.get('lora_dropout')!r} is not a rate in [0, 1)")
  return cfg


def load_adapters(adapter_dir: str, params: dict, config: ModelConfig, *,
                  target: str = "auto") -> tuple[lora_lib.LoraConfig, dict]:
  """(LoraConfig, LoRA params) from a PEFT LoRA folder onto plain base `params` of `config`; the
  LoraConfig carries the folder's r, lora_alpha, target modules and lora_dropout."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  cfg = _read_config(adapter_dir)
  chosen = targets_lib.select(config, target)
  single, _ = projection_maps(config, chosen)
  by_module = {tm.name[:-len(".weight")]: key for key, tm in single.items()}
  weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    raise ValueError(f"{adapter_dir}: no {WEIGHTS_FILE}")
  tensors = load_file(weights_path)
  found = {}
  for key, value in tensors.items():
    if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
      raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")
    module, kind = key[len(PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
    if module not in by_module:
      raise ValueError(f"{weights_path}: module {module!r} is not a single-Linear projection of "
                       f"{chosen.architecture}")
    found.setdefault(by_module[module], {})[kind] = value
  names = sorted({name for name, _ in found})
  lora = lora_lib.LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(names),
                             dropout=float(cfg.get("lora_dropout") or 0.0))
  specs = lora_lib.lora_specs(config, lora)
  stacked = {}
  for name in names:
    group = "attn" if name in ("wq", "wk", "wv", "wo") else "mlp"
    spec = specs["layers"][group][name]
    perm = _perm(name, config, chosen)
    a_layers, b_layers = [], []
    for layer in range(config.num_layers):
      pair = found.get((name, layer), {})
      if set(pair) != {"lora_A", "lora_B"}:
        raise ValueError(f"{weights_path}: {single[(name, layer)].name[:-len('.weight')]} lacks "
                         "lora_A / lora_B (PEFT layers_to_transform is not supported)")
      a, b = from_peft(np.asarray(pair["lora_A"], np.float32), np.asarray(pair["lora_B"], np.float32),
                       spec.a.shape[1:], spec.b.shape[1:], perm)
      a_layers.append(a)
      b_layers.append(b)
    dtype = np.dtype(spec.a.dtype)
    stacked[name] = (np.stack(a_layers).astype(dtype), np.stack(b_layers).astype(dtype))

  def wrap(path, spec, leaf):
    if not lora_lib.is_lora(spec):
      return leaf
    a, b = stacked[lora_lib._key_name(path[-1])]  # pylint: disable=protected-access
    return lora_lib.LoraWeight(leaf, a, b, spec.scale, spec.in_ndim)
  adapted = jax.tree_util.tree_map_with_path(
      wrap, specs, params, is_leaf=lambda x: lora_lib.is_spec(x) or lora_lib.is_lora(x))
  return lora, adapted
