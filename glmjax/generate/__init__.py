"""Generation: KV-cache decoding strategies, GLM blank filling, chat, and the CLI."""

from glmjax.generate.decoding import (GenerationOptions, GenerationResult, generate, left_pad,
                                      text_prompt)
from glmjax.generate.glm import (BlankFill, Convention, continue_glm, fill_blanks, generate_glm,
                                 glm_row)


def main(argv=None) -> int:
  """`glmjax generate` (see glmjax.generate.cli)."""
  from glmjax.generate import cli  # pylint: disable=import-outside-toplevel
  return cli.main(argv)
