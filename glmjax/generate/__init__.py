"""Generation: KV-cache decoding strategies, GLM blank filling, chat, and the CLI."""

from glmjax.generate.decoding import (GenerationOptions, GenerationResult, generate, left_pad,
                                      text_prompt)
