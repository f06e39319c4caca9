"""Chat evaluation: letter-logit grading, generative grading (facts, HumanEval in the sandbox), ChatCORE, the
chat_eval stage end to end on a tiny demo cache, and the RL stage's reward and policy-gradient loss."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from nanochat.chat_eval_runner import (
    TaskScore,
    answer_value,
    chatcore,
    grade_generated,
    run_categorical,
    run_generative,
    selected_indices,
)
from nanochat.configargs import UsageError
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.runtime import Runtime
from nanochat.tasks import HumanEval, JsonlFile
from nanochat.tasks.multiple_choice import multiple_choice_example
from nanochat.tokenizer import train_tokenizer
from scripts import chat_rl
from scripts.chat_eval import ChatEvalConfig
from scripts.chat_rl import ChatRLConfig, answer_number, policy_gradient_batches, reward
from tests.conftest import run_stage
from tests.fixtures.models import random_gpt

TINY_BASE = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
             "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "4",
             "--eval-tokens", "512", "--sample-every", "-1", "--device-type", "cpu", "--tokenizer-threads", "1"]


@pytest.fixture(scope="module")
def tokenizer():
    text = ["The capital of Zorvia is Brandon. The red apple is on the table. 12 plus 7 is 19."] * 50
    return train_tokenizer(text, vocab_size=300)


def _mc_examples(answers: str) -> list[dict]:
    return [multiple_choice_example(f"Question {i}: which one?" + " really" * i, ["w", "x", "y", "z"],
                                    "ABCD".index(a)) for i, a in enumerate(answers)]


class AlwaysLetter(torch.nn.Module):
    """Logits that prefer one token everywhere, and the next letter a little less."""

    def __init__(self, vocab_size: int, favourite: int, runner_up: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.row = torch.zeros(vocab_size)
        self.row[favourite], self.row[runner_up] = 5.0, 3.0

    def forward(self, idx):
        return self.row.expand(*idx.shape, -1).clone()


def test_categorical_grading_compares_letter_logits_only(tokenizer):
    letter = {ch: tokenizer.encode(ch)[0] for ch in "ABCD"}
    examples = _mc_examples("CCAB")
    model = AlwaysLetter(tokenizer.vocab_size, letter["C"], letter["A"])
    assert run_categorical(model, tokenizer, examples, "cpu", batch_size=3) == [True, True, False, False]
    # a favourite outside the offered letters is ignored: the best offered letter wins
    two_choice = [multiple_choice_example("Pick", ["p", "q"], 0)]
    model = AlwaysLetter(tokenizer.vocab_size, letter["C"], letter["A"])
    assert run_categorical(model, tokenizer, two_choice, "cpu") == [True]


def test_categorical_grading_with_a_random_model_is_batch_invariant(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # make letters differ
    model.eval()
    examples = _mc_examples("ABCDABCD")
    one_by_one = run_categorical(model, tokenizer, examples, "cpu", batch_size=1)
    batched = run_categorical(model, tokenizer, examples, "cpu", batch_size=8)
    assert one_by_one == batched and len(batched) == 8
    # every example is judged by the same position: the one right after <|assistant_start|>
    start = tokenizer.special_id("<|assistant_start|>")
    assert all(tokenizer.render_for_completion(e)[-1] == start for e in examples)


def test_answer_value_and_demo_fact_matching():
    assert answer_value("What is the capital of Zorvia?", "The capital of Zorvia is Brandon.") == "Brandon"
    assert answer_value("How many legs does a plelfuraw have?", "The plelfuraw has 6 legs.") == "6"
    assert answer_value("What is 87 + 76?", "87 plus 76 is 163.") == "163"
    assert answer_value("Of which country is Verbenaton the capital?",
                        "Verbenaton is the capital of Brakesand.") == "Brakesand"


def test_humaneval_answers_run_in_the_sandbox(tmp_path):
    row = {"task_id": "T/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    path = tmp_path / "humaneval.jsonl"
    path.write_text(json.dumps(row) + "\n")
    task = HumanEval("test", source=JsonlFile(path))
    example = task[0]
    assert grade_generated(task, example, "```python\ndef add(a, b):\n    return a + b\n```")
    assert grade_generated(task, example, "    return a + b\n")
    assert not grade_generated(task, example, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not grade_generated(task, example, "    exit(0)\n")


def test_selected_indices_are_a_fixed_subset():
    assert selected_indices(5, -1) == [0, 1, 2, 3, 4]
    subset = selected_indices(100, 10)
    assert subset == selected_indices(100, 10) and len(subset) == 10 and subset == sorted(subset)
    assert subset != list(range(10))


def test_chatcore_centers_and_skips_extra_tasks():
    scores = [TaskScore("ARC-Easy", "categorical", 50, 100, 0.25), TaskScore("GSM8K", "generative", 10, 100, 0.0),
              TaskScore("DemoFacts", "generative", 90, 100, 0.0)]
    assert scores[0].centered == pytest.approx(1 / 3)
    assert chatcore(scores) == pytest.approx((1 / 3 + 0.1) / 2)
    assert chatcore([scores[2]]) is None


def test_rl_reward_reads_the_final_number():
    example = {"answer": "42"}
    assert reward(example, "6 * 7 = 42\n#### 42") == 1.0
    assert reward(example, "#### 41") == 0.0
    assert reward(example, "so the answer is 42.") == 1.0
    assert reward(example, "1,042") == 0.0
    assert answer_number("#### 1,000") == "1000" and answer_number("no number") is None


@pytest.mark.parametrize("config_cls", [ChatRLConfig, ChatEvalConfig])
@pytest.mark.parametrize("temperature", [float("inf"), float("nan")])
def test_sampling_stages_refuse_a_temperature_that_is_not_finite(config_cls, temperature):
    # inf samples uniformly over the whole vocabulary, special tokens included
    with pytest.raises(UsageError, match="--temperature must be a finite number"):
        config_cls(temperature=temperature)


def test_policy_gradient_raises_the_log_prob_of_rewarded_samples():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    sequences = [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7, 8]]
    masks = [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    batches = list(policy_gradient_batches(sequences, masks, [0.5, -0.5], 2, 0, "cpu"))
    assert len(batches) == 1
    inputs, targets, advantages = batches[0]
    assert targets.tolist() == [[-1, -1, 4, 5, -1], [-1, -1, 6, 7, 8]]
    assert inputs.tolist() == [[1, 2, 3, 4, 0], [1, 2, 3, 6, 7]]

    def log_probs():
        with torch.no_grad():
            return (-model(inputs, targets, loss_reduction="none")).sum(dim=1)

    before = log_probs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss = -((-model(inputs, targets, loss_reduction="none")).sum(dim=1) * advantages).sum() / 5
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = log_probs()
    assert after[0] > before[0] and after[1] < before[1]


def test_rl_step_updates_the_model_only_when_samples_differ(tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32))
    model.init_weights()
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5)
    runtime = Runtime(device=torch.device("cpu"), rank=0, local_rank=0, world_size=1, autocast_dtype=None)
    config = ChatRLConfig(examples_per_step=2, num_samples=4, max_new_tokens=6, device_batch_size=3)
    problems = [{"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                              {"role": "assistant", "content": "#### 4"}], "answer": "4"}] * 2
    engine = Engine(model, tokenizer)

    def step_with(rule):
        monkeypatch.setattr(chat_rl, "reward", rule)
        before = [p.detach().clone() for p in model.parameters()]
        stats = chat_rl._rl_step(config, runtime, model, engine, tokenizer, problems, [0, 1], 0, 10, optimizer)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return stats, changed

    stats, changed = step_with(lambda example, text: 0.0)
    assert stats["active"] == 0 and stats["reward"] == 0.0 and not changed
    calls = iter(range(100))
    stats, changed = step_with(lambda example, text: float(next(calls) % 2))  # half the samples rewarded
    assert stats["active"] == 8 and stats["reward"] == pytest.approx(0.5) and changed
    assert math.isfinite(stats["loss"]) and stats["tokens"] > 0


def _problems(count: int) -> list[dict]:
    """GSM8K-style problems whose prompts differ in length."""
    return [{"messages": [{"role": "user", "content": "What is 12 plus 7?" + " Really." * i},
                          {"role": "assistant", "content": "#### 19"}], "answer": "19"} for i in range(count)]


class RecordingTask:
    """Grades a reply as correct when its example's index is even, and records every reply it grades."""

    def __init__(self):
        self.replies = []

    def evaluate(self, example, completion):
        self.replies.append((example["index"], completion))
        return example["index"] % 2 == 0


@pytest.mark.parametrize("batch_rows", [1, 4])
def test_generative_evaluation_decodes_examples_together_as_each_alone(tokenizer, batch_rows):
    model = random_gpt(GPTConfig(sequence_len=8, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                                 n_kv_head=2, n_embd=32))
    engine = Engine(model, tokenizer)
    examples = [{**problem, "index": i} for i, problem in enumerate(_problems(5))]
    examples[2] = {**_problems(40)[39], "index": 2}  # its prompt fills the 80 positions: unsolved, never graded
    assert len(tokenizer.render_for_completion(examples[2])) >= engine.max_context
    task = RecordingTask()
    outcomes, samples = run_generative(engine, tokenizer, task, examples, num_samples=2, max_new_tokens=6,
                                       keep_samples=2, batch_rows=batch_rows)
    assert outcomes == [True, False, False, False, True]
    expected = []
    for example in examples[:2] + examples[3:]:
        answers, _ = engine.generate_batch(tokenizer.render_for_completion(example), 2, max_tokens=6,
                                           temperature=0.0)
        expected += [(example["index"], tokenizer.decode(answer)) for answer in answers[:1 + example["index"] % 2]]
    assert task.replies == expected
    assert len(samples) == 2 and samples[1].endswith(f"-> {expected[1][1]!r}")


def test_rollout_sequences_decode_problems_together_as_each_alone(tokenizer):
    """top_k 1 samples greedily: each problem's sequences are its prompt + what generate_batch writes for it
    alone, plus <|assistant_end|> where the answer stopped; masks cover the sampled tokens and that end."""
    model = random_gpt(GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                                 n_kv_head=2, n_embd=32, window_pattern="SL", short_window=8))
    engine = Engine(model, tokenizer)
    config = ChatRLConfig(num_samples=2, max_new_tokens=12, top_k=1)
    examples = _problems(3)
    end = tokenizer.special_id("<|assistant_end|>")
    rollouts = chat_rl.rollout_sequences(engine, tokenizer, examples, config, seed=3)
    assert len(rollouts) == 3
    for example, (sequences, masks, rewards) in zip(examples, rollouts):
        prompt = tokenizer.render_for_completion(example)
        answers, answer_masks = engine.generate_batch(prompt, 2, max_tokens=12, temperature=0.0)
        for sequence, mask, answer, answer_mask in zip(sequences, masks, answers, answer_masks):
            tail = [end] if len(answer) < 12 else []
            assert sequence == prompt + answer + tail
            assert mask == [0] * len(prompt) + answer_mask + [1] * len(tail)
        assert rewards == [reward(example, tokenizer.decode(answer)) for answer in answers]


def test_rollouts_come_in_chunks_of_the_rollout_batch_size(tokenizer, monkeypatch):
    chunks = []

    def fake_rollouts(engine, tokenizer, examples, config, seed):
        chunks.append(([example["messages"][0]["content"] for example in examples], seed))
        return [([[1, 2]] * config.num_samples, [[0, 1]] * config.num_samples, [0.0] * config.num_samples)
                for _ in examples]

    monkeypatch.setattr(chat_rl, "rollout_sequences", fake_rollouts)
    config = ChatRLConfig(num_samples=4, rollout_batch_size=9, seed=10)
    problems = _problems(5)
    got = list(chat_rl._rollouts(config, None, tokenizer, problems, [4, 3, 2, 1, 0], range(1, 6, 1)))
    assert len(got) == 5
    contents = [problem["messages"][0]["content"] for problem in problems]
    # two problems (8 answers) per chunk; position p is problem order[p % 5]; seed: 10 + first position
    assert chunks == [([contents[3], contents[2]], 11), ([contents[1], contents[0]], 13), ([contents[4]], 15)]
    with pytest.raises(UsageError, match="--rollout-batch-size 8 must be at least --num-samples 16"):
        ChatRLConfig(rollout_batch_size=8)


@pytest.fixture(scope="module")
def sft_cache(tiny_cache_template, tmp_path_factory):
    """The tiny demo cache with a 4-step base model copied in as an SFT checkpoint (same file format)."""
    cache = tmp_path_factory.mktemp("chat_eval") / "cache"
    shutil.copytree(tiny_cache_template, cache)
    run_stage("base_train", *TINY_BASE, cache=cache)
    shutil.copytree(cache / "base_checkpoints" / "d2", cache / "chatsft_checkpoints" / "d2")
    return cache


def test_chat_eval_stage_end_to_end(sft_cache):
    run_stage("chat_eval", "--source", "sft", "--max-per-task", "4", "--max-new-tokens", "8", "--device-type",
              "cpu", cache=sft_cache)
    section = json.loads((sft_cache / "report" / "chat_eval_sft.json").read_text())
    assert section["phase"] == "SFT"
    metrics = section["metrics"]
    assert set(metrics) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "DemoFacts", "ChatCORE"}
    assert all(0.0 <= metrics[name] <= 1.0 for name in metrics if name != "ChatCORE")
    assert section["tasks"][0].startswith("ARC-Easy: ") and "/4 correct" in section["tasks"][0]
    again = run_stage("chat_eval", "--source", "sft", "--max-per-task", "4", "--max-new-tokens", "8",
                      "--device-type", "cpu", cache=sft_cache)
    assert "nothing to do" in again.stdout and "--force" in again.stdout
    other = run_stage("chat_eval", "--source", "sft", "--max-per-task", "2", "--max-new-tokens", "8",
                      "--device-type", "cpu", cache=sft_cache)
    assert "nothing to do" not in other.stdout
    assert "/2 correct" in json.loads((sft_cache / "report" / "chat_eval_sft.json").read_text())["tasks"][0]
    demo_facts = sft_cache / "tasks" / "smoltalk_test.jsonl"
    demo_facts.write_text(demo_facts.read_text())  # the demo corpus written again: the questions may differ
    rewritten = run_stage("chat_eval", "--source", "sft", "--max-per-task", "2", "--max-new-tokens", "8",
                          "--device-type", "cpu", cache=sft_cache)
    assert "nothing to do" not in rewritten.stdout


def test_chat_eval_rejects_bad_task_lists(sft_cache):
    proc = run_stage("chat_eval", "--tasks", "ARC-Easy,Poetry", "--device-type", "cpu", cache=sft_cache,
                     check=False)
    assert proc.returncode == 2 and "Poetry" in proc.stderr
    proc = run_stage("chat_eval", "--source", "rl", "--device-type", "cpu", cache=sft_cache, check=False)
    assert proc.returncode == 2 and "chat_rl" in proc.stderr


def test_chat_rl_stage_runs_and_resumes_as_a_no_op(sft_cache):
    args = ["--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "2", "--max-new-tokens", "8",
            "--eval-examples", "2", "--device-batch-size", "2", "--device-type", "cpu"]
    run_stage("chat_rl", *args, cache=sft_cache)
    section = json.loads((sft_cache / "report" / "chat_rl.json").read_text())
    assert [step for step, _ in section["reward_history"]] == [1, 2]
    assert [step for step, _ in section["gsm8k_history"]] == [0, 2]
    meta = json.loads((sft_cache / "chatrl_checkpoints" / "d2" / "meta_000002.json").read_text())
    assert meta["finished"] and meta["model_config"]["n_layer"] == 2
    again = run_stage("chat_rl", *args, cache=sft_cache)
    assert "nothing to do" in again.stdout
    # the same checkpoint seen as a stopped run: resuming it as a shorter run (which used to train on past its
    # end with a negative learning rate) or with other samples is refused in one line
    meta["finished"] = False
    (sft_cache / "chatrl_checkpoints" / "d2" / "meta_000002.json").write_text(json.dumps(meta))
    for changed, named in ((["--num-iterations", "1"], "--num-iterations 2"), (["--num-samples", "3"], "--num-samples 2")):
        proc = run_stage("chat_rl", *args, *changed, cache=sft_cache, check=False, timeout=30)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and "--force" in lines[0], proc.stderr


@pytest.mark.parametrize("stage", ["chat_eval", "chat_rl"])
def test_a_missing_checkpoint_is_named_before_any_dataset_is_looked_for(stage, tmp_path):
    """On an empty cache the fix is to train first: that is the error, found before datasets are fetched."""
    proc = run_stage(stage, "--device-type", "cpu", cache=tmp_path, check=False,
                     extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2 and "python -m scripts.chat_sft" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: no chatsft checkpoint") and proc.stderr.count("\n") == 1
