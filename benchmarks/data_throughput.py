"""Input pipeline throughput: GLM blank infilling vs causal LM vs seqio's own causal-LM packing.

  python benchmarks/data_throughput.py [--batches 400] [--sequence_length 512] [--batch_size 8]

For each pipeline (packed rows of `sequence_length`, `batch_size` rows per
batch, default corpus): first-batch latency, then over `--batches` batches
(after 50 untimed batches) examples/s, tokens/s (non-padding), loss tokens/s, the non-padding share,
and CPU seconds spent per 1k tokens (process CPU time, all threads) -> the
share of one core the pipeline needs to feed a train step that consumes
`--train_tokens_per_s` (default 730: HuggingFace eager llama-small on this
CPU, /work/shared/bench/README.md; plain JAX ~485). Also the cost of the two
ways to resume: tf.data iterator checkpoint (save/restore time, size) and
replay with `skip` (batches/s while skipping).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

import glmjax.tasks as tasks  # noqa: E402
from glmjax.tasks import corpus, registry, sources  # noqa: E402


def seqio_causal_lm(sequence_length: int, batch_size: int) -> tf.data.Dataset:
  """The t5x-style peer: tokenize + EOS + split to length + seqio.DecoderFeatureConverter(pack=True)."""
  name = "bench_seqio_causal_lm"
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=sources.records_source(functools.partial(corpus.load, "shakespeare"), ["train"], ["text"]),
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                       functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                       seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(tasks.default_vocabulary(), add_eos=True)},
        shuffle_buffer_size=registry.CORPUS_SHUFFLE_BUFFER)
  lengths = {"targets": sequence_length}
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=True, seed=0, num_epochs=None,
                                                   trim_output_features=False)
  ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensor_slices(
      {"targets": tf.RaggedTensor.from_uniform_row_length(
          tf.pad(ex["targets"], [[0, (-tf.size(ex["targets"])) % sequence_length]]), sequence_length)}
  ).map(lambda x: {"targets": tf.boolean_mask(x["targets"], x["targets"] > 0)}))
  ds = seqio.DecoderFeatureConverter(pack=True)(ds, lengths)
  return ds.batch(batch_size, drop_remainder=True)


def measure(name: str, dataset: tf.data.Dataset, batches: int, train_tokens_per_s: float,
            warmup: int = 50) -> dict:
  """Steady state: the first `warmup` batches (and whatever the prefetch buffers hold) are not timed."""
  start = time.perf_counter()
  iterator = iter(dataset)
  next(iterator)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(iterator)
  examples = tokens = loss_tokens = cells = 0
  wall0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = {k: v.numpy() for k, v in next(iterator).items()}
    segment_ids = batch.get("segment_ids", batch.get("decoder_segment_ids"))
    loss = batch.get("loss_mask", batch.get("decoder_loss_weights"))
    examples += int(segment_ids.max(axis=1).sum())
    tokens += int((segment_ids > 0).sum())
    loss_tokens += int((loss > 0).sum())
    cells += segment_ids.size
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  cpu_per_1k = 1000 * cpu / tokens
  return {"pipeline": name, "first batch s": first, "examples/s": examples / wall, "tokens/s": tokens / wall,
          "loss tokens/s": loss_tokens / wall, "non-pad share": tokens / cells,
          "CPU s per 1k tokens": cpu_per_1k, "cores used": cpu / wall,
          "core share at train rate": cpu_per_1k * train_tokens_per_s / 1000,
          "x train rate": tokens / wall / train_tokens_per_s}


def resume_costs(sequence_length: int, batch_size: int, skip_batches: int) -> dict:
  make = lambda: tasks.get_dataset("glmjax_blank_infilling_default", sequence_length=sequence_length,
                                   batch_size=batch_size, seed=0)
  iterator = tasks.DatasetIterator(make())
  for _ in range(5):
    next(iterator)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    iterator.save(pathlib.Path(tmp) / "data" / "process_0")
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in pathlib.Path(tmp).rglob("*") if p.is_file())
    restored = tasks.DatasetIterator(make())
    start = time.perf_counter()
    restored.restore(pathlib.Path(tmp) / "data" / "process_0")
    next(restored)
    restore_s = time.perf_counter() - start
  start = time.perf_counter()
  next(iter(make().skip(skip_batches)))
  skip_s = time.perf_counter() - start
  return {"checkpoint save s": save_s, "checkpoint MB": size / 2**20, "restore + first batch s": restore_s,
          f"skip {skip_batches} batches s": skip_s, "skip batches/s": skip_batches / skip_s}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", type=int, default=400, help="timed batches, after 50 untimed ones")
  parser.add_argument("--sequence_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--train_tokens_per_s", type=float, default=730.0)
  parser.add_argument("--skip_batches", type=int, default=200)
  args = parser.parse_args(argv)
  L, B = args.sequence_length, args.batch_size
  pipelines = {
      "glmjax blank infilling (default mixture, GLM-10B rates)":
          lambda: tasks.get_dataset("glmjax_blank_infilling_default", sequence_length=L, batch_size=B, seed=0),
      "glmjax blank infilling (GLM-130B rates)":
          lambda: tasks.get_dataset("glmjax_blank_infilling_glm130b", sequence_length=L, batch_size=B, seed=0),
      "glmjax causal LM (glmjax_causal_lm)":
          lambda: tasks.get_dataset("glmjax_causal_lm", sequence_length=L, batch_size=B, seed=0),
      "seqio causal LM (DecoderFeatureConverter, English only)": lambda: seqio_causal_lm(L, B),
  }
  print(f"sequence_length={L} batch_size={B} batches={args.batches} "
        f"train step reference={args.train_tokens_per_s:.0f} tokens/s")
  rows = [measure(name, make(), args.batches, args.train_tokens_per_s) for name, make in pipelines.items()]
  columns = list(rows[0])
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    print("| " + " | ".join(v if isinstance(v, str) else f"{v:,.3g}" if v < 100 else f"{v:,.0f}"
                            for v in row.values()) + " |")
  for key, value in resume_costs(L, B, args.skip_batches).items():
    print(f"{key}: {value:.3g}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
