"""End to end on a model trained by the default experiment: `glmjax eval` and `glmjax generate`."""

import json

from glmjax.cli import evaluate, generate
from glmjax.evaluate import runner


def test_trained_model_fills_blanks_better_than_unigram(trained_workdir, tmp_path, capsys):
  out = tmp_path / "results.json"
  rc = evaluate.main(["--checkpoint", str(trained_workdir), "--tasks", "glmjax_blank_infilling_default",
                      "--lm_batches", "16", "--output", str(out)])
  assert rc == 0
  table = capsys.readouterr().out
  results = json.loads(out.read_text())
  assert set(results["tasks"]) == {"glmjax_corpus_en_blank_infilling", "glmjax_corpus_zh_blank_infilling"}
  for name, r in results["tasks"].items():
    assert r["tokens"] > 500, name  # zh: its whole validation split (~700 Part B tokens)
    assert r["nll"] < r["unigram_nll"], (name, r)
    assert r["accuracy"] > r["unigram_accuracy"], (name, r)
    assert name in table
  assert results["average"]["nll"] < results["average"]["unigram_nll"]


def test_eval_multiple_choice_and_cot_tasks_run(trained_workdir, tmp_path):
  out = tmp_path / "qa.json"
  rc = evaluate.main(["--checkpoint", str(trained_workdir), "--tasks",
                      "glmjax_flan_play_few_shot,glmjax_flan_arith_cot", "--max_examples", "8",
                      "--max_new_tokens", "24", "--output", str(out)])
  assert rc == 0
  tasks = json.loads(out.read_text())["tasks"]
  mc, cot = tasks["glmjax_flan_play_few_shot"], tasks["glmjax_flan_arith_cot"]
  assert mc["kind"] == "multiple_choice" and mc["examples"] == 8 and 0 <= mc["accuracy"] <= 1
  assert cot["kind"] == "chain_of_thought" and cot["examples"] == 8
  assert len(cot["samples"]) == 3 and all(s["answer"] for s in cot["samples"])


def test_options_are_parsed_from_the_last_flan_block():
  prompt = ("Q: first\nOPTIONS:\n- a\n- b\nA: a\n\n"
            "Which play?\nSome passage\nOPTIONS:\n- Macbeth\n- As You Like It\nAnswer:")
  assert runner.parse_options(prompt) == ["Macbeth", "As You Like It"]
  assert runner.parse_options("no options here") == []


def test_generate_cli_fills_blanks_and_continues(trained_workdir, tmp_path, capsys):
  rc = generate.main(["--checkpoint", str(trained_workdir), "--prompt",
                      "To be, or not to [MASK], that is the question.", "--max_new_tokens", "6"])
  assert rc == 0
  header, filled = capsys.readouterr().out.split("\n", 1)
  assert header == "### To be, or not to [MASK], that is the question."
  filled = filled.rstrip("\n")
  assert filled.startswith("To be, or not to ") and filled.endswith(", that is the question.")
  assert "[MASK]" not in filled
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("My lord,\nROMEO:\\nBut soft\n")
  rc = generate.main(["--checkpoint", str(trained_workdir), "--prompts_file", str(prompts),
                      "--strategy", "sample", "--top_p", "0.9", "--seed", "1", "--max_new_tokens", "8"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "### My lord," in out and "### ROMEO:\nBut soft" in out
  rc = generate.main(["--checkpoint", str(trained_workdir), "--prompt", "Hello", "--mode", "chat",
                      "--max_new_tokens", "4"])
  assert rc == 0 and "assistant: " in capsys.readouterr().out
  assert generate.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
