"""ChatGLM3-style chat: role tokens, multi-turn history, the format of glmjax.tasks.formats.chat.

A conversation is one GLM example: Part A is `[gMASK]`; Part B is `<sop>`
then, per turn, `<|role|>` "\\n" content. To answer, the prompt ends with
`<|assistant|>` "\\n" and generation stops at `<|user|>`, `<|observation|>`,
`<eop>` or eos, exactly where training taught the model to stop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from glmjax.generate.decoding import GenerationOptions, GenerationResult
from glmjax.generate.glm import GLM, Convention, continue_glm

ROLES = ("system", "user", "assistant", "observation")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str
  content: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"chat role {self.role!r} is not one of {ROLES}")


def chat_prompt(history: Sequence[Turn], ids, encode: Callable[[str], list]) -> tuple[list, list]:
  """(Part A, Part B) token ids asking for the assistant's next turn after `history`.

  `ids`: glmjax.tasks.vocab.SpecialIds; `encode`: text -> ids without specials added.
  """
  part_b = [ids.sop]
  for turn in history:
    part_b += [ids.role(turn.role), ids.newline] + list(encode(turn.content))
  part_b += [ids.assistant, ids.newline]
  return [ids.gmask], part_b


def stop_ids(ids) -> tuple:
  return tuple(dict.fromkeys((ids.user, ids.observation, ids.eop, ids.eos)))


def reply(params, config, history: Sequence[Turn], ids, encode, options: GenerationOptions,
          convention: Convention = GLM, on_token=None) -> GenerationResult:
  """The assistant's next turn (token ids in the result; stop token stripped by `sequences()`)."""
  part_a, part_b = chat_prompt(history, ids, encode)
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys(stop_ids(ids) + options.stop_ids)))
  return continue_glm(params, config, [part_a], [part_b], [0], options, convention=convention,
                      on_token=on_token)
