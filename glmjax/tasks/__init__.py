"""seqio tasks for GLM training: vocabulary, objectives, formats, converter, registry.

Importing this package registers the glmjax_* tasks and mixtures (list in
glmjax.tasks.registry; splits train and validation).

Vocabulary (glmjax.tasks.vocab):
  default_vocabulary() -> GLMVocabulary     shipped SentencePiece model, 8192 ids
  special_ids(vocabulary=None) -> SpecialIds  .pad .eos .unk .mask .smask .gmask
      .sop .eop .system .user .assistant .observation .newline
  In the shipped vocabulary: <pad> 0, </s> 1, <unk> 2, [MASK] 3, [sMASK] 4,
  [gMASK] 5, <sop> 6, <eop> 7, <|system|> 8, <|user|> 9, <|assistant|> 10,
  <|observation|> 11, "\\n" 12. Specials are user-defined symbols: the text
  "[gMASK]" encodes to 5.

Objectives (glmjax.tasks.objectives), seqio preprocessors on token ids in
"targets": blank_infilling(objective="token"|"sentence"|"document" or
rates={...}; default GLM-10B rates, GLM_130B_RATES), prefix_lm, causal_lm.

Formats (glmjax.tasks.formats): flan(format="zero_shot"|"few_shot"|"cot"|
"few_shot_cot"), instruction (Alpaca), chat (ChatGLM3 roles).

Every task emits the flat GLM example (tokens, targets, loss_mask,
positions, block_positions, bidirectional); GLMFeatureConverter packs it
into the batch contract (+ segment_ids). get_dataset(...) runs the lot:

  get_dataset(mixture_or_task_name, *, sequence_length, batch_size,
              split="train", shuffle=True, seed=0, shard_info=None,
              pack=True, num_epochs=None, prompt_layout=None,
              count_truncated=False) -> tf.data.Dataset

seqio_batches(name, ...) takes any registered task or mixture: the flat GLM
example through get_dataset, a `targets`-only task as plain causal LM
(seqio.DecoderFeatureConverter). import_task_modules(modules) imports the
user modules that register more tasks (DataConfig.modules).

DatasetIterator(dataset) yields numpy dicts and saves/restores its position.
"""

import tensorflow as _tf

# The input pipeline runs on the host CPU; TensorFlow must not claim the
# accelerators (or their memory) that JAX trains on.
_tf.config.set_visible_devices([], "GPU")

from glmjax.tasks import objectives, formats, sources, synthetic, corpus, vocab  # noqa: E402,F401
from glmjax.tasks.converter import GLMFeatureConverter  # noqa: E402
from glmjax.tasks.pipeline import DatasetIterator, get_dataset, seqio_batches  # noqa: E402
from glmjax.tasks.registry import (chat_jsonl_source, import_task_modules, output_features,
                                   register_chat_task, register_flan_task, register_instruction_task,
                                   register_text_task)
from glmjax.tasks.vocab import default_vocabulary, special_ids  # noqa: E402

from glmjax.tasks import registry as _registry

_registry.register_all()

__all__ = [
    "DatasetIterator", "GLMFeatureConverter", "chat_jsonl_source", "default_vocabulary", "get_dataset",
    "import_task_modules", "output_features", "register_chat_task", "register_flan_task",
    "register_instruction_task", "register_text_task", "seqio_batches", "special_ids",
]
