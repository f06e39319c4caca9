"""CORE: bundle parsing, prompt rendering, span finding and scoring against a model whose answers are known;
and the base_eval stage (bits per byte, samples, CORE or its skip) on a tiny demo cache.

The fake model reads characters (one token per ASCII character, BOS = 256) and predicts, with a large
logit, the next character of the cycle "abc...xyz " (so "z" is followed by a space and a space by "a");
every other token gets logit 0. Its choice on every example of tests/fixtures/eval_bundle is therefore
known: choice 3/4 right, schema 2/3, language modeling 2/4.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch

from nanochat.configargs import UsageError
from nanochat.core_eval import (
    CoreTask,
    centered_accuracy,
    evaluate_core,
    evaluate_task,
    fewshot_examples,
    load_bundle,
    load_task_data,
    render_candidates,
    scored_spans,
)
from tests.conftest import run_stage

BUNDLE = Path(__file__).parent / "fixtures" / "eval_bundle"
CYCLE = string.ascii_lowercase + " "


class CharTokenizer:
    bos_id = 256

    def encode(self, texts, prepend=None):
        head = [] if prepend is None else [prepend]
        return [head + [ord(ch) for ch in text] for text in texts]


class AlphabetModel(torch.nn.Module):
    """Bigram logits: a spike on the cycle successor of each character."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(257, 257)
        for i, ch in enumerate(CYCLE):
            table[ord(ch), ord(CYCLE[(i + 1) % len(CYCLE)])] = 12.0
        self.register_buffer("table", table)
        self.calls = 0

    def forward(self, idx):
        self.calls += 1
        return self.table[idx]


def test_bundle_is_parsed_with_baselines_and_defaults():
    tasks = {t.label: t for t in load_bundle(BUNDLE)}
    assert list(tasks) == ["toy_choice", "toy_schema", "toy_lm"]
    assert tasks["toy_choice"] == CoreTask("toy_choice", "multiple_choice", "toy/choice.jsonl", 1, " ", 25.0)
    assert tasks["toy_schema"].continuation_delimiter == ""
    assert tasks["toy_lm"].continuation_delimiter == " "  # the default when the YAML leaves it out
    assert tasks["toy_lm"].num_fewshot == 2 and tasks["toy_lm"].random_baseline == 0.0


def test_task_data_order_is_a_fixed_shuffle():
    task = load_bundle(BUNDLE)[0]
    first, second = load_task_data(BUNDLE, task), load_task_data(BUNDLE, task)
    assert first == second and len(first) == 4


def test_missing_bundle_names_the_download_step(tmp_path):
    with pytest.raises(UsageError, match="download_data.sh"):
        load_bundle(tmp_path / "eval_bundle")
    partial = tmp_path / "partial"
    shutil.copytree(BUNDLE, partial)
    (partial / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntoy_choice,25\n")
    with pytest.raises(UsageError, match="no random baseline for toy_schema"):
        load_bundle(partial)


def test_prompts_render_per_task_type():
    mc_shot = {"query": "Q: one", "choices": ["x", "y"], "gold": 1}
    assert render_candidates({"query": "Q: two", "choices": ["a", "b"]}, "multiple_choice", " ", [mc_shot]) == [
        "Q: one y\n\nQ: two a", "Q: one y\n\nQ: two b"]
    schema_shot = {"context_options": ["c1", "c2"], "continuation": "end", "gold": 0}
    assert render_candidates({"context_options": ["p", "q"], "continuation": "go"}, "schema", " ",
                             [schema_shot]) == ["c1 end\n\np go", "c1 end\n\nq go"]
    lm_shot = {"context": "ctx ", "continuation": "cont"}
    assert render_candidates({"context": " hello  ", "continuation": "world"}, "language_modeling", " ",
                             [lm_shot]) == ["ctx cont\n\nhello", "ctx cont\n\nhello world"]
    with pytest.raises(ValueError):
        render_candidates({}, "essay", " ")


def test_fewshot_examples_exclude_the_item_and_are_stable():
    data = [{"i": i} for i in range(10)]
    shots = fewshot_examples(data, 3, 4)
    assert len(shots) == 4 and {"i": 3} not in shots
    assert shots == fewshot_examples(data, 3, 4)
    assert fewshot_examples(data, 3, 0) == []
    assert len(fewshot_examples(data[:2], 0, 5)) == 1


def test_scored_spans():
    # multiple choice: after the common prefix; one choice a prefix of another still scores one token
    assert scored_spans([[9, 1, 2, 3], [9, 1, 2, 4, 5]], "multiple_choice") == [(3, 4), (3, 5)]
    assert scored_spans([[9, 1, 2], [9, 1, 2, 7]], "multiple_choice") == [(2, 3), (2, 4)]
    # schema: the common suffix
    assert scored_spans([[9, 5, 1, 2], [9, 6, 6, 1, 2]], "schema") == [(2, 4), (3, 5)]
    # language modeling: the tokens of the full text past the context alone
    assert scored_spans([[9, 1, 2], [9, 1, 2, 3, 4]], "language_modeling") == [(3, 5)]


def test_centered_accuracy_arithmetic():
    assert centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25) == pytest.approx(1.0)
    assert centered_accuracy(0.75, 25) == pytest.approx(2 / 3)
    assert centered_accuracy(0.4, 50) == pytest.approx(-0.2)
    assert centered_accuracy(0.5, 0) == pytest.approx(0.5)


def test_core_on_the_fixture_bundle_matches_the_known_answers():
    model = AlphabetModel()
    seen = []
    result = evaluate_core(model, CharTokenizer(), BUNDLE, "cpu",
                           on_task=lambda task, acc, centered: seen.append(task.label))
    assert result.accuracy == pytest.approx({"toy_choice": 3 / 4, "toy_schema": 2 / 3, "toy_lm": 2 / 4})
    assert result.centered == pytest.approx({"toy_choice": 2 / 3, "toy_schema": 1 / 3, "toy_lm": 1 / 2})
    assert result.core == pytest.approx(0.5)
    assert result.examples == {"toy_choice": 4, "toy_schema": 3, "toy_lm": 4}
    assert seen == ["toy_choice", "toy_schema", "toy_lm"]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batching_and_padding_do_not_change_results(batch_size):
    model = AlphabetModel()
    result = evaluate_core(model, CharTokenizer(), BUNDLE, "cpu", batch_size=batch_size)
    assert result.core == pytest.approx(0.5)
    if batch_size == 64:
        assert model.calls == 3  # one forward pass per task


def test_long_prompts_are_cropped_from_the_left():
    task = next(t for t in load_bundle(BUNDLE) if t.label == "toy_lm")
    data = load_task_data(BUNDLE, task)
    # 12 tokens still hold the end of the context and the continuation of every example
    accuracy = evaluate_task(AlphabetModel(), CharTokenizer(), data, task, "cpu", max_seq_len=12)
    assert accuracy == pytest.approx(0.5)


def test_max_per_task_limits_examples():
    result = evaluate_core(AlphabetModel(), CharTokenizer(), BUNDLE, "cpu", max_per_task=2)
    assert result.examples == {"toy_choice": 2, "toy_schema": 2, "toy_lm": 2}


def test_ranks_split_examples_and_sum_counts(monkeypatch):
    """Two ranks each score half of the examples; all_reduce (faked here as the sum over both ranks'
    counts) gives the single-process accuracy."""
    task = next(t for t in load_bundle(BUNDLE) if t.label == "toy_choice")
    data = load_task_data(BUNDLE, task)
    per_rank = {}

    def fake_all_reduce(tensor):
        per_rank[len(per_rank)] = tensor.clone()

    monkeypatch.setattr("nanochat.core_eval.dist.all_reduce", fake_all_reduce)
    for rank in (0, 1):
        evaluate_task(AlphabetModel(), CharTokenizer(), data, task, "cpu", rank=rank, world_size=2)
    correct, total = (per_rank[0] + per_rank[1]).tolist()
    assert total == 4 and correct == 3
    assert per_rank[0][1].item() == 2 and per_rank[1][1].item() == 2


TINY_BASE = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
             "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "4",
             "--eval-tokens", "512", "--sample-every", "-1", "--device-type", "cpu", "--tokenizer-threads", "1"]
EVAL_ARGS = ["--split-tokens", "1024", "--device-batch-size", "8", "--device-type", "cpu",
             "--tokenizer-threads", "1"]


@pytest.fixture(scope="module")
def base_cache(tiny_cache_template, tmp_path_factory):
    cache = tmp_path_factory.mktemp("base_eval") / "cache"
    shutil.copytree(tiny_cache_template, cache)
    run_stage("base_train", *TINY_BASE, cache=cache)
    return cache


def test_base_eval_on_the_demo_corpus_skips_core(base_cache):
    proc = run_stage("base_eval", *EVAL_ARGS, cache=base_cache)
    assert "CORE: skipped" in proc.stdout
    section = json.loads((base_cache / "report" / "base_eval.json").read_text())
    assert section["phase"] == "BASE" and "metrics" not in section
    assert 0 < section["val_bpb"] < 20 and 0 < section["train_bpb"] < 20
    assert len(section["samples"]) >= 3 and section["model_tag"] == "d2" and section["step"] == 4

    again = run_stage("base_eval", *EVAL_ARGS, cache=base_cache, extra_env={"WORLD_SIZE": "1"})
    assert "nothing to do" in again.stdout and "bpb" not in again.stdout
    # under torchrun the ranks split the documents, so another process count is another evaluation (here
    # it goes on to set up a process group that has no rendezvous, and fails: the point is that it tried)
    two = run_stage("base_eval", *EVAL_ARGS, cache=base_cache, extra_env={"WORLD_SIZE": "2"}, check=False)
    assert "nothing to do" not in two.stdout
    assert json.loads((base_cache / "report" / "base_eval.json").read_text()) == section
    weights = base_cache / "base_checkpoints" / "d2" / "model_000004.pt"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert "val bpb" in run_stage("base_eval", *EVAL_ARGS, cache=base_cache).stdout  # a rewritten checkpoint
    assert "val bpb" in run_stage("base_eval", *EVAL_ARGS, "--force", cache=base_cache).stdout


def test_base_eval_computes_core_when_the_bundle_is_present(base_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base_cache, cache)
    shutil.copytree(BUNDLE, cache / "eval_bundle")
    proc = run_stage("base_eval", *EVAL_ARGS, "--max-per-task", "3", cache=cache)
    assert "CORE metric:" in proc.stdout
    section = json.loads((cache / "report" / "base_eval.json").read_text())
    assert set(section["metrics"]) == {"CORE"}
    assert -1.0 <= section["metrics"]["CORE"] <= 1.0
    assert [line.split(":")[0] for line in section["core_tasks"]] == ["toy_choice", "toy_schema", "toy_lm"]
    assert all("(3 examples)" in line for line in section["core_tasks"])


def test_base_eval_on_real_data_without_bundle_is_a_usage_error(base_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base_cache, cache)
    (cache / "DEMO").unlink()
    shutil.rmtree(cache / "report")
    proc = run_stage("base_eval", *EVAL_ARGS, cache=cache, check=False)
    assert proc.returncode == 2
    assert "download_data.sh" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == "" and not (cache / "report").exists()
