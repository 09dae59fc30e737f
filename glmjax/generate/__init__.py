"""Generation: KV-cache decoding strategies, GLM blank filling, chat."""

from glmjax.generate.decoding import (GenerationOptions, GenerationResult, generate, left_pad,
                                      text_prompt)
from glmjax.generate.glm import (BlankFill, Convention, continue_glm, fill_blanks, generate_glm,
                                 glm_row)

