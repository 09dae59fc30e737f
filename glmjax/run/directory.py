"""The run directory's layout and its safe writes: what `glmjax train` / `glmjax import` write.

    runs/demo/
      config.gin      operative gin config of the last (re)start, written once its checkpoint
                      restored (or the fresh state was built): a refused run leaves it untouched
      model.gin       the ModelConfig of an imported checkpoint (`glmjax import`)
      checkpoints/N/  orbax steps (glmjax.trainer.checkpoint): state, data, config, data_iterator
      skipped_checkpoints/N/  steps set aside, never deleted: unreadable ones, or newer ones than
                      the `--step` a run resumed from
      tokenizer/      tokenizer files that came with an import
      metrics.jsonl, tensorboard/, loss.png, summary.json

Every file is written to a temporary name and renamed (`atomic_write_text`),
and nothing is ever deleted: steps a run cannot use move to
skipped_checkpoints/. This module imports nothing of glmjax, so the trainer
builds on it; loading (glmjax.run.load) and importing (glmjax.run.imported)
build on the trainer.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

CONFIG_GIN = "config.gin"
MODEL_GIN = "model.gin"
CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_checkpoints"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class UnreadableCheckpoint(RuntimeError):
  """A step directory exists but cannot be read back (truncated or corrupt files)."""


# --- writes ---------------------------------------------------------------------------------

def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and a rename, so a
  reader (or a crash) sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def check_folder_argument(path: str, flag: str) -> str:
  """A folder the command may create: ValueError (one line) when it names an existing file."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag} {path} is a file; give a folder (it is created if missing)")
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
  return path


# --- reading -------------------------------------------------------------------------------

def step_directories(checkpoints_dir: str) -> list[int]:
  """Steps orbax finished writing (a partial save is a `N.orbax-checkpoint-tmp-*` folder)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoints_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, n)))


class Workdir:
  """A `glmjax train` / `glmjax import` run directory (or, for reading, its checkpoints/)."""

  def __init__(self, path: str):
    path = os.path.abspath(path)
    if os.path.basename(path) == CHECKPOINTS and not os.path.isdir(os.path.join(path, CHECKPOINTS)):
      path = os.path.dirname(path)
    self.path = path

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def checkpoints(self) -> str:
    return self.file(CHECKPOINTS)

  def steps(self) -> list[int]:
    return step_directories(self.checkpoints)

  def require_steps(self, flag: str = "--checkpoint") -> list[int]:
    """The steps, or ValueError (one line) naming what is missing."""
    if not os.path.exists(self.path):
      raise ValueError(f"{flag} {self.path} does not exist; give a `glmjax train` workdir")
    if not os.path.isdir(self.path):
      raise ValueError(f"{flag} {self.path} is a file; give a `glmjax train` workdir")
    steps = self.steps()
    if not steps:
      raise ValueError(f"{flag} {self.path} holds no checkpoint ({CHECKPOINTS}/N); train first "
                       "(glmjax train --workdir ...) or import one (glmjax import --out ...)")
    return steps

  def select_step(self, step: Optional[int], flag: str = "--step") -> list[int]:
    """Candidate steps, newest first: just `step` when given, else every complete step."""
    steps = self.require_steps()
    if step is None:
      return sorted(steps, reverse=True)
    if step not in steps:
      raise ValueError(f"{flag} {step} is not a checkpoint of {self.path} (steps there: {steps})")
    return [step]

  def run_info(self, step: int) -> dict:
    """The `config` item of a step: {"gin": operative config, ...} (orbax JSON item 'metadata')."""
    path = os.path.join(self.checkpoints, str(step), "config", "metadata")
    try:
      with open(path, encoding="utf-8") as f:
        info = json.load(f)
    except (OSError, ValueError) as e:
      raise UnreadableCheckpoint(f"{path}: {type(e).__name__}: {e}") from e
    if not isinstance(info, dict) or not info.get("gin"):
      raise UnreadableCheckpoint(f"{path} has no operative gin config (not written by glmjax)")
    return info

  def set_aside(self, step: int, reason: str) -> str:
    """Moves a step out of checkpoints/ (never deletes it); returns where it went."""
    os.makedirs(self.file(SKIPPED), exist_ok=True)
    target = os.path.join(self.file(SKIPPED), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(os.path.join(self.checkpoints, str(step)), target)
    atomic_write_text(os.path.join(target, "WHY.txt"), reason + "\n")
    return target

  def truncate_metrics(self, last_step: int) -> None:
    """Drops metrics.jsonl records past `last_step` (steps a killed run logged after its last
    checkpoint are replayed on resume and logged again)."""
    path = self.file(METRICS)
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      if int(record.get("step", 0)) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
      atomic_write_text(path, "".join(kept))


def check_new_run_folder(path: str, flag: str = "--out") -> str:
  """A folder for a new run: absent or empty (an import never writes over anything)."""
  path = check_folder_argument(path, flag)
  if os.path.isdir(path) and os.listdir(path):
    held = "a checkpoint" if step_directories(os.path.join(path, CHECKPOINTS)) else "files"
    raise ValueError(f"{flag} {path} already holds {held}; import into a new or empty folder")
  return path


def first_line(e: BaseException) -> str:
  """`TypeName: first line of the message` (tensorstore errors run to dozens of lines)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"
