"""Post-training: LoRA adapters as a transform of the param spec tree (lora.py; PEFT-format
adapters in glmjax/export/peft.py), NF4 / int8 weight quantization and QLoRA (quant.py),
P-Tuning v2 prefixes (prefix.py), DPO / cDPO / IPO (dpo.py; preference pairs in
glmjax/tasks/preference.py) and a Bradley-Terry reward model (reward.py).

Why not a maintained JAX library: qwix (Google's quantization / LoRA library, PyPI 0.1.8) and
aqtp (AQT, 0.9.0) both work by intercepting `dot_general` / `einsum` inside Flax Linen or NNX
modules (`qwix.apply_lora_to_model(model: nn.Module | nnx.Module, ...)`); glmjax's model is pure
functions over a dict of arrays with no modules to intercept, so either would need a second,
module-based model. Here a frozen base weight and its adapters form one pytree node
(`lora.LoraWeight`) in the place of the weight; the layer scan turns it dense one layer at a time
(`glmjax.model.layers.materialize`).
"""
