"""Evaluating a chat model on tasks: multiple choice by letter logits, free answers by generation.

- Categorical tasks (ARC, MMLU): the prompt is the conversation up to `<|assistant_start|>`; the model's
  logits at that last position are compared over the answer letters' tokens only, so no sampling is
  involved and a model that has not learned the answer format is still measured. Prompts run in
  right-padded batches.
- Generative tasks: `Engine.generate_batches` writes `num_samples` answers per example (tools on, so GSM8K
  can use the calculator), decoding examples together in batches of up to GENERATIVE_BATCH_ROWS answers;
  the example counts as solved when any of them is graded correct (pass@k). HumanEval answers run in the
  sandbox of `nanochat.execution`.
- DemoFacts (demo corpus only): the first question of each held-out SmolTalk test conversation, about
  entities that never appear in fine-tuning data; correct when the reference's answer word (a capital, a
  color, a number...) appears as a whole word in the reply.

ChatCORE is the mean over the standard tasks evaluated of the centered accuracy
(accuracy - baseline) / (1 - baseline), baseline 0.25 for the four-way multiple-choice tasks and 0 for
generated answers. Examples are split across ranks (index i on rank i % world_size) and counts summed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.configargs import UsageError
from nanochat.engine import Engine, batch_decode_path
from nanochat.execution import run_to_completion
from nanochat.tasks import SmolTalk, Task, is_demo_cache, make_task
from nanochat.tasks.humaneval import program as humaneval_program

# Display name -> (task registry name, split, ChatCORE baseline); the order is the report's order.
STANDARD_TASKS: dict[str, tuple[str, str, float]] = {
    "ARC-Easy": ("arc_easy", "test", 0.25),
    "ARC-Challenge": ("arc_challenge", "test", 0.25),
    "MMLU": ("mmlu", "test", 0.25),
    "GSM8K": ("gsm8k", "test", 0.0),
    "HumanEval": ("humaneval", "test", 0.0),
}
DEMO_FACTS = "DemoFacts"
SUBSET_SEED = 1234  # which examples --max-per-task keeps: a fixed random subset (MMLU's test is sorted)
# Answers decoded in one batch by generative evaluation (whole examples of num_samples answers, at least one).
GENERATIVE_BATCH_ROWS = 64
_WORD = re.compile(r"[A-Za-z0-9]+")


class DemoFacts:
    """Exact-match questions about held-out entities, from the demo corpus's SmolTalk test split."""

    kind = "generative"

    def __init__(self, root: Path):
        self.conversations = SmolTalk("test", root=root)

    @property
    def source(self):
        return self.conversations.source

    @property
    def rows(self):
        return self.conversations.rows

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        messages = self.conversations[index]["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        question, answer = messages[first], messages[first + 1]
        return {"messages": [question, answer], "value": answer_value(question["content"], answer["content"])}

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        return example["value"].lower() in {w.lower() for w in _WORD.findall(completion)}


def answer_value(question: str, answer: str) -> str:
    """The word that carries an answer: its last word that the question does not contain ("The capital of
    Zorvia is Brandon." -> "Brandon"; "The plelfuraw has 6 legs." -> "6")."""
    asked = {w.lower() for w in _WORD.findall(question)}
    words = _WORD.findall(answer)
    for word in reversed(words):
        if word.lower() not in asked:
            return word
    return words[-1] if words else answer


@dataclass
class TaskScore:
    name: str
    kind: str
    correct: int
    total: int
    baseline: float
    samples: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1.0 - self.baseline)


def chatcore(scores: Sequence[TaskScore]) -> float | None:
    """Mean centered accuracy over the standard tasks among `scores` (None when there are none)."""
    standard = [s.centered for s in scores if s.name in STANDARD_TASKS]
    return sum(standard) / len(standard) if standard else None


def build_task(name: str, root: Path) -> Task | DemoFacts:
    """The evaluation split of a task given by its display name; UsageError for unknown or impossible ones."""
    if name == DEMO_FACTS:
        if not is_demo_cache(root):
            raise UsageError(f"{DEMO_FACTS} exists only on the demo corpus; leave it out of --tasks")
        return DemoFacts(root)
    if name not in STANDARD_TASKS:
        raise UsageError(f"unknown task {name!r} in --tasks; choose from {', '.join([*STANDARD_TASKS, DEMO_FACTS])}")
    registry_name, split, _ = STANDARD_TASKS[name]
    return make_task(registry_name, split, root=root)


def baseline_of(name: str) -> float:
    return STANDARD_TASKS[name][2] if name in STANDARD_TASKS else 0.0


def selected_indices(length: int, max_per_task: int) -> list[int]:
    """All indices, or a fixed random subset of `max_per_task` of them in increasing order."""
    if max_per_task <= 0 or max_per_task >= length:
        return list(range(length))
    return sorted(random.Random(SUBSET_SEED).sample(range(length), max_per_task))


def _sum_over_ranks(correct: int, total: int, device, world_size: int) -> tuple[int, int]:
    counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return correct, total


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token ({encoded})")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def run_categorical(model, tokenizer, examples: Sequence[Mapping[str, Any]], device, batch_size: int = 8,
                    autocast: Callable | None = None) -> list[bool]:
    """For each multiple-choice example: does the answer letter get the highest logit among the letters
    offered, right after `<|assistant_start|>`? Prompts longer than the model's positions keep their end."""
    max_len = int(getattr(model, "rotary_len", model.config.sequence_len))
    outcomes: list[bool] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(example)[-max_len:] for example in batch]
        ids = torch.full((len(prompts), max(len(p) for p in prompts)), tokenizer.bos_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        with autocast() if autocast is not None else nullcontext():
            logits = model(ids.to(device))
        last = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)
        final = logits[torch.arange(len(prompts), device=logits.device), last].float()
        for row, example in enumerate(batch):
            letters = list(example["letters"])
            choice = final[row, letter_token_ids(tokenizer, letters)].argmax().item()
            outcomes.append(letters[choice] == example["answer"])
    return outcomes


def grade_generated(task: Task | DemoFacts, example: Mapping[str, Any], completion: str,
                    timeout: float = 5.0) -> bool:
    """Whether one generated reply solves the example; HumanEval runs in the sandbox."""
    if getattr(task, "name", None) == "humaneval":
        return run_to_completion(humaneval_program(example, completion), timeout=timeout).success
    return task.evaluate(example, completion)


def run_generative(engine: Engine, tokenizer, task: Task | DemoFacts, examples: Sequence[Mapping[str, Any]],
                   num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, seed: int = 42, keep_samples: int = 0,
                   progress: Callable[[], None] | None = None,
                   batch_rows: int = GENERATIVE_BATCH_ROWS) -> tuple[list[bool], list[str]]:
    """pass@num_samples per example, and the first `keep_samples` (prompt, reply) pairs as text.

    Examples are decoded together, as many per batch as `batch_rows` answers hold (at least one); a batch
    samples with seed + the index of its first example. A prompt that fills the model's context is unsolved.
    """
    outcomes, samples = [], []
    per_batch = max(1, batch_rows // num_samples)
    for first in range(0, len(examples), per_batch):
        chunk = examples[first:first + per_batch]
        prompts = [tokenizer.render_for_completion(example) for example in chunk]
        fits = [i for i, prompt in enumerate(prompts) if len(prompt) < engine.max_context]
        generated = engine.generate_batches([prompts[i] for i in fits], num_samples=num_samples,
                                            max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                            seed=seed + first)
        replies = {i: [tokenizer.decode(answer) for answer in answers] for i, (answers, _) in zip(fits, generated)}
        for i, example in enumerate(chunk):
            outcomes.append(i in replies and any(grade_generated(task, example, reply) for reply in replies[i]))
            if i in replies and len(samples) < keep_samples:
                samples.append(f"{example['messages'][0]['content'][:200]!r} -> {replies[i][0][:200]!r}")
            if progress is not None:
                progress()
    return outcomes, samples


def evaluate_task(name: str, task: Task | DemoFacts, model, tokenizer, device, max_per_task: int = -1,
                  batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_k: int | None = None, rank: int = 0, world_size: int = 1,
                  autocast: Callable | None = None, show_progress: bool = False,
                  keep_samples: int = 2) -> TaskScore:
    """One task's score, summed over ranks; this rank takes every world_size-th selected example."""
    indices = selected_indices(len(task), max_per_task)[rank::world_size]
    examples = [task[i] for i in indices]
    samples: list[str] = []
    with tqdm(total=len(examples), desc=name, leave=False, disable=not show_progress) as bar:
        if task.kind == "categorical":
            outcomes = []
            for start in range(0, len(examples), batch_size):
                outcomes += run_categorical(model, tokenizer, examples[start:start + batch_size], device,
                                            batch_size, autocast)
                bar.update(min(batch_size, len(examples) - start))
        else:
            engine = Engine(model, tokenizer, decode=batch_decode_path(device))
            outcomes, samples = run_generative(engine, tokenizer, task, examples, num_samples, max_new_tokens,
                                               temperature, top_k, keep_samples=keep_samples,
                                               progress=lambda: bar.update(1))
    correct, total = _sum_over_ranks(sum(outcomes), len(outcomes), device, world_size)
    return TaskScore(name, task.kind, correct, total, baseline_of(name), samples)
