"""A reward model driven by `glmjax train` (experiments/reward_llama_small.gin, shrunk) on the toy
Shakespeare preference set, then scored by `glmjax eval`: a full fine-tune starts from the base run
(RewardConfig.base_checkpoint) and after 60 steps ranks the held-out (validation) pairs well above
chance and above its own start; a LoRA reward run checkpoints the adapters and the head only and
resumes exactly; `glmjax eval` prints and writes the pairwise accuracy, mean margin and
Bradley-Terry loss that a hand computation from each held-out pair's rewards gives."""

import json
import contextlib
import functools
import os

import jax
import numpy as np
import pytest

from glmjax.cli import evaluate as eval_cli
from glmjax.run import load as load_lib
from glmjax.tasks import preference
from glmjax.tasks import vocab as vocab_lib
from glmjax.trainer.metrics import read_jsonl
from glmjax.tuning import lora as lora_lib
from glmjax.tuning import reward
from tests.train.test_gin import REPO
from tests.tuning.helpers import cli_train

SHRINK = ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 2",
          "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 16", "ModelConfig.ffn_dim = 64",
          "ModelConfig.max_length = 64", "DataConfig.sequence_length = 64", "DataConfig.batch_size = 8",
          "TrainerConfig.eval_every = 0", "TrainerConfig.eval_at_end = False",
          "TrainerConfig.peak_flops_per_device = 1e9", "TrainerConfig.progress_bar = False",
          "TrainerConfig.plot = False", "OptimizerConfig.warmup_steps = 0",
          "CheckpointConfig.save_every = 2", "CheckpointConfig.async_save = False", "MeshConfig.data = 2",
          "MeshConfig.fsdp = -1"]
FULL_STEPS = 60  # held-out accuracy 0.72 / 0.79 / 0.72 at seeds 0 / 1 / 2 (init: 0.49 / 0.49 / 0.28)
LORA_STEPS = 4
TASK = preference.TOY_TASK


run = functools.partial(cli_train, shrink=SHRINK)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("reward")
  paths = {name: str(root / name) for name in ("base", "full", "straight", "resumed")}
  with contextlib.chdir(REPO):
    assert run("experiments/llama_small_causal_lm.gin", paths["base"], 1,
               ["DataConfig.sequence_length = 32"]) == 0
    full = ["LoraConfig.rank = 0", f"RewardConfig.base_checkpoint = '{paths['base']}'",
            "OptimizerConfig.learning_rate = 1e-3", "CheckpointConfig.save_every = 1000"]
    assert run("experiments/reward_llama_small.gin", paths["full"], FULL_STEPS, full) == 0
    lora = [f"LoraConfig.base_checkpoint = '{paths['base']}'", "LoraConfig.rank = 4",
            "OptimizerConfig.learning_rate = 1e-2"]
    assert run("experiments/reward_llama_small.gin", paths["straight"], LORA_STEPS, lora) == 0
    assert run("experiments/reward_llama_small.gin", paths["resumed"], LORA_STEPS // 2, lora) == 0
    assert run("experiments/reward_llama_small.gin", paths["resumed"], LORA_STEPS, lora) == 0
    yield paths


def _train_records(workdir):
  return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"]


def _saved_param_paths(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(os.path.join(workdir, "checkpoints", str(step), "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def _hand_margins(params, config, split, sequence_length=64, limit=None):
  """r(chosen) - r(rejected) of the toy task's `split` pairs (the first `limit`), one pair at a
  time, each reward the head on the last response token's final hidden state, in NumPy."""
  vocabulary = vocab_lib.default_vocabulary()
  ids = vocab_lib.special_ids(vocabulary)
  params = jax.device_get(params)  # host arrays: one device, nothing of the run's mesh
  hidden_of = jax.jit(lambda model, rows: reward.hidden_states(model, rows, config))  # one compile
  kernel, bias = np.asarray(params["head"]["kernel"], np.float64), float(params["head"]["bias"])
  margins = []
  for record in preference.corpus_preference_records(split)[:limit]:
    rows = preference.pair_rows(vocabulary.encode(record["prompt"]), vocabulary.encode(record["chosen"]),
                                vocabulary.encode(record["rejected"]), sequence_length, "instruction", ids)
    if rows is None:
      continue
    hidden = np.asarray(hidden_of(params["model"], rows), np.float64)
    last = [int(np.nonzero(mask)[0].max()) for mask in rows["loss_mask"]]
    r = [hidden[i, last[i]] @ kernel + bias for i in range(2)]
    margins.append(r[0] - r[1])
  return np.asarray(margins)


def test_full_fine_tune_starts_from_the_base_run(runs):
  """Step 1's loss is the Bradley-Terry loss of the base run's params with a fresh head on the
  first 4 training pairs: the model started from RewardConfig.base_checkpoint."""
  base = load_lib.load_params(runs["base"])
  loaded = reward.load_reward_run(runs["full"])
  experiment = loaded.experiment
  head = reward.init_head(experiment.model, jax.random.fold_in(jax.random.PRNGKey(experiment.trainer.seed), 0x4EAD))
  batch = next(preference.pair_batches(TASK, "train", pairs=4, sequence_length=64))
  want, _ = reward.objective({"model": base.params, "head": head}, batch, experiment.model)
  first = _train_records(runs["full"])[0]
  assert first["step"] == 1
  np.testing.assert_allclose(first["loss"], float(want), rtol=1e-5)
  # and the model moved: every leaf the reward depends on is trained in a full fine-tune (the LM
  # head is not on the reward's path, its gradient is zero)
  for group in ("embed", "layers", "final_norm"):
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         loaded.params["model"][group], base.params[group])
    assert all(jax.tree.leaves(moved)), group


def test_training_raises_held_out_pairwise_accuracy_above_chance(runs, capsys, tmp_path):
  """`glmjax eval` on the 60-step run: the 39 validation pairs (never trained on) are ranked well
  above chance (>= 26 / 39 right, one-sided binomial p < 0.03) and above the run's own start (the
  seed's head on the base run), and the printed / written numbers are the hand computation's."""
  out = str(tmp_path / "eval.json")
  assert eval_cli.main(["--checkpoint", runs["full"], "--output", out]) == 0
  printed = capsys.readouterr().out
  with open(out, encoding="utf-8") as f:
    results = json.load(f)
  record = results["tasks"][TASK]
  assert results["split"] == "validation" and record["kind"] == "reward" and results["step"] == FULL_STEPS
  loaded = reward.load_reward_run(runs["full"])
  margins = _hand_margins(loaded.params, loaded.config, "validation")
  assert record["pairs"] == len(margins) == 39 and record["dropped"] == 0
  assert record["pairwise_accuracy"] == np.mean(margins > 0)
  np.testing.assert_allclose(record["mean_margin"], margins.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(record["bt_loss"], np.mean(np.logaddexp(0.0, -margins)), rtol=1e-4)
  row = next(line for line in printed.splitlines() if line.startswith(TASK))
  assert f"{record['pairwise_accuracy']:.4f}" in row.split()
  assert record["pairwise_accuracy"] >= 26 / 39

  base = load_lib.load_params(runs["base"])
  experiment = loaded.experiment
  head = reward.init_head(experiment.model, jax.random.fold_in(jax.random.PRNGKey(experiment.trainer.seed), 0x4EAD))
  start = np.mean(_hand_margins({"model": base.params, "head": head}, loaded.config, "validation") > 0)
  assert record["pairwise_accuracy"] >= start + 0.15, (start, record["pairwise_accuracy"])


def test_lora_checkpoint_holds_adapters_and_head_and_names_the_base(runs):
  paths = _saved_param_paths(runs["straight"], LORA_STEPS)
  adapters = [p for p in paths if p.startswith("model/")]
  assert sorted(p for p in paths if not p.startswith("model/")) == ["head/bias", "head/kernel"]
  assert len(adapters) == 2 * 7 and all(p.endswith(("/a", "/b")) for p in adapters), paths
  info = load_lib.Workdir(runs["straight"]).run_info(LORA_STEPS)
  gin_text = info["gin"].replace("\\\n", " ")  # gin wraps long lines with a backslash
  gin_text = " ".join(gin_text.split())
  assert f"LoraConfig.base_checkpoint = '{runs['base']}'" in gin_text
  assert f"RewardConfig.task = '{TASK}'" in gin_text
  # loaded back: the base run's weights bit for bit under trained adapters
  base = load_lib.load_params(runs["base"])
  loaded = reward.load_reward_run(runs["straight"])
  wq = loaded.params["model"]["layers"]["attn"]["wq"]
  assert lora_lib.is_lora(wq) and np.any(np.asarray(wq.b) != 0)
  np.testing.assert_array_equal(np.asarray(wq.base), np.asarray(base.params["layers"]["attn"]["wq"]))
  np.testing.assert_array_equal(np.asarray(loaded.params["model"]["embed"]["embedding"]),
                                np.asarray(base.params["embed"]["embedding"]))


def test_lora_resume_is_exact(runs):
  straight, resumed = _train_records(runs["straight"]), _train_records(runs["resumed"])
  assert [r["step"] for r in resumed] == list(range(1, LORA_STEPS + 1))
  for key in ("loss", "pairwise_accuracy", "reward_margin", "grad_norm"):
    assert [r[key] for r in resumed] == [r[key] for r in straight], key
  assert all(k in straight[-1] for k in ("learning_rate", "nonfinite_streak"))


def test_eval_of_the_lora_run_equals_the_hand_count(runs, capsys, tmp_path):
  out = str(tmp_path / "eval.json")
  assert eval_cli.main(["--checkpoint", runs["straight"], "--tasks", TASK, "--split", "train",
                        "--max_examples", "10", "--batch_size", "4", "--output", out]) == 0
  capsys.readouterr()
  with open(out, encoding="utf-8") as f:
    record = json.load(f)["tasks"][TASK]
  loaded = reward.load_reward_run(runs["straight"])
  margins = _hand_margins(loaded.params, loaded.config, "train", limit=10)
  assert record["pairs"] == 10 and record["pairwise_accuracy"] == np.mean(margins > 0)
  np.testing.assert_allclose(record["mean_margin"], margins.mean(), rtol=1e-4, atol=1e-5)


def test_eval_refuses_what_a_reward_run_cannot_score(runs, capsys):
  assert eval_cli.main(["--checkpoint", runs["straight"], "--tasks", "glmjax_corpus_en_causal_lm"]) == 2
  assert "not a preference task" in capsys.readouterr().err
  assert eval_cli.main(["--checkpoint", runs["straight"], "--batch_size", "3"]) == 2
  assert "even" in capsys.readouterr().err
  assert eval_cli.main(["--checkpoint", runs["base"]]) == 2  # not a reward run: --tasks needed
  assert "--tasks is required" in capsys.readouterr().err


def test_generate_and_export_refuse_a_reward_run_in_one_line(runs, capsys, tmp_path):
  """A reward run's params are a decoder plus a scalar head: generate / export say so (exit 2,
  one line naming --checkpoint) and write nothing."""
  from glmjax.cli import export as export_cli, generate as generate_cli  # pylint: disable=import-outside-toplevel
  out = tmp_path / "hf"
  for main, argv in ((generate_cli.main, ["--checkpoint", runs["full"], "--prompt", "To be"]),
                     (export_cli.main, ["--checkpoint", runs["full"], "--out", str(out)])):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "reward-model run" in err[0], err
  assert not out.exists()


def test_bad_reward_options_exit_2_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  for bad, message in ((["RewardConfig.task = 'no_such_task'"], "RewardConfig.task='no_such_task' is not a registered"),
                       (["RewardConfig.style = 'chat'"], "RewardConfig.style='chat' is not one of"),
                       (["PrefixConfig.pre_seq_len = 2", "LoraConfig.rank = 0", "DataConfig.pack = False"],
                        "RewardConfig.task goes with LoRA")):
    code = run("experiments/reward_llama_small.gin", str(tmp_path / "run"), 1, bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
