"""Chat: role tokens, multi-turn history, in the model family's own template.

GLM vocabularies (glmjax.tasks.vocab.GLMVocabulary; the format of glmjax.tasks.formats.chat):
a conversation is one GLM example: Part A is `[gMASK]`; Part B is `<sop>` then, per turn,
`<|role|>` "\\n" content. To answer, the prompt ends with `<|assistant|>` "\\n" and generation
stops at `<|user|>`, `<|observation|>`, `<eop>` or eos, exactly where training taught the model
to stop.

ChatGLM2/3's tokenizer (glmjax.tasks.vocab.ChatGLMVocabulary, a model imported from ChatGLM3-6B,
prompt_layout 'causal'): ChatGLM3's own template, THUDM/chatglm3-6b tokenization_chatglm.py
`build_chat_input`: `[gMASK] sop`, then per turn `build_single_message` =
`<|role|>` + encode(f"{metadata}\\n") + encode(content), then `<|assistant|>`
alone; the model writes the metadata line itself. Generation stops at eos, `<|user|>` or
`<|observation|>` (modeling_chatglm.py `chat`, `eos_token_id`), and the reply is split as
`process_response` does: the first line is the metadata, the rest (stripped) the content.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from glmjax.generate.decoding import GenerationOptions, GenerationResult
from glmjax.generate.glm import GLM, Convention, continue_glm
from glmjax.tasks.vocab import ChatGLMSpecialIds

ROLES = ("system", "user", "assistant", "observation")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str
  content: str
  metadata: str = ""  # ChatGLM3: the text after the role token, before "\n" (a tool name)

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"chat role {self.role!r} is not one of {ROLES}")


def is_chatglm3(ids) -> bool:
  """Whether `ids` are a ChatGLM2/3 tokenizer's (chat prompts then use ChatGLM3's template)."""
  return isinstance(ids, ChatGLMSpecialIds)


def check_template(ids, convention: Convention) -> None:
  """ValueError (one line) for ChatGLM3's template under a layout other than its own."""
  if is_chatglm3(ids) and convention.prompt_layout != "causal":
    raise ValueError(f"chat with a ChatGLM2/3 tokenizer uses ChatGLM3's template, which needs "
                     f"prompt_layout 'causal', not {convention.prompt_layout!r}; drop "
                     "--prompt_layout / --causal_inputs / --positions_1d")


def chatglm3_message(turn: Turn, ids, encode: Callable[[str], list]) -> list:
  """`build_single_message(role, metadata, message)` (THUDM/chatglm3-6b tokenization_chatglm.py)."""
  return [ids.role(turn.role)] + list(encode(f"{turn.metadata}\n")) + list(encode(turn.content))


def chat_prompt(history: Sequence[Turn], ids, encode: Callable[[str], list]) -> tuple[list, list]:
  """(Part A, Part B) token ids asking for the assistant's next turn after `history`.

  `ids`: glmjax.tasks.vocab.SpecialIds; `encode`: text -> ids without specials added.
  ChatGLM2/3 ids: Part A `[gMASK]`, Part B `sop` + the messages + `<|assistant|>`, which under
  the causal layout is `build_chat_input`'s row with positions 0..n-1.
  """
  if is_chatglm3(ids):
    part_b = [ids.sop]
    for turn in history:
      part_b += chatglm3_message(turn, ids, encode)
    return [ids.gmask], part_b + [ids.assistant]
  part_b = [ids.sop]
  for turn in history:
    part_b += [ids.role(turn.role), ids.newline] + list(encode(turn.content))
  part_b += [ids.assistant, ids.newline]
  return [ids.gmask], part_b


def stop_ids(ids) -> tuple:
  if is_chatglm3(ids):  # modeling_chatglm.py chat(): [eos, <|user|>, <|observation|>]
    return (ids.eos, ids.user, ids.observation)
  return tuple(dict.fromkeys((ids.user, ids.observation, ids.eop, ids.eos)))


def reply_turns(text: str, ids) -> list[Turn]:
  """The assistant's Turns from its decoded reply. ChatGLM3: as `process_response`
  (THUDM/chatglm3-6b modeling_chatglm.py) fills the history, one Turn per `<|assistant|>`
  segment, its first line the metadata (a segment without "\\n" is all content), the content
  stripped when the metadata is blank (a tool call's is kept as written)."""
  if not is_chatglm3(ids):
    return [Turn("assistant", text)]
  turns = []
  for segment in text.split("<|assistant|>"):
    metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
    turns.append(Turn("assistant", content if metadata.strip() else content.strip(), metadata))
  return turns


def shown(turn: Turn) -> str:
  """What ChatGLM3's `chat` returns for a plain reply: the content with its "[[训练时间]]"
  placeholder replaced by "2023年" (`process_response`); the history keeps the content as is."""
  return turn.content if turn.metadata.strip() else turn.content.replace("[[训练时间]]", "2023年")


class ReplyStream:
  """Streams the content of a ChatGLM3 reply (the text after its metadata line) from decoded
  pieces: nothing until the metadata line ends, then the content without its leading
  whitespace (`stream_chat` shows `process_response`'s content too). Other vocabularies: the
  pieces as they come. `finish(shown)` emits what the final text adds to what was streamed."""

  def __init__(self, emit: Callable[[str], None], ids):
    self.emit, self.chatglm3, self.raw, self.sent = emit, is_chatglm3(ids), "", 0

  def __call__(self, piece: str) -> None:
    if not self.chatglm3:
      self.emit(piece)
      return
    self.raw += piece
    if "\n" not in self.raw:
      return
    content = self.raw.split("\n", 1)[1].lstrip()
    if len(content) > self.sent:
      self.emit(content[self.sent:])
      self.sent = len(content)

  def finish(self, final: str) -> None:
    if self.chatglm3:
      streamed = self.raw.split("\n", 1)[1].lstrip()[:self.sent] if "\n" in self.raw else ""
      if final.startswith(streamed) and len(final) > len(streamed):
        self.emit(final[len(streamed):])


def reply(params, config, history: Sequence[Turn], ids, encode, options: GenerationOptions,
          convention: Convention = GLM, on_token: Optional[Callable] = None) -> GenerationResult:
  """The assistant's next turn (token ids in the result; stop token stripped by `sequences()`)."""
  check_template(ids, convention)
  part_a, part_b = chat_prompt(history, ids, encode)
  options = dataclasses.replace(options, stop_ids=tuple(dict.fromkeys(stop_ids(ids) + options.stop_ids)))
  return continue_glm(params, config, [part_a], [part_b], [0], options, convention=convention,
                      on_token=on_token)
