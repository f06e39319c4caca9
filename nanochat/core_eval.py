"""The CORE metric (DCLM, arXiv:2406.11794): few-shot tasks scored by likelihood, centered on chance, averaged.

The eval bundle (`<cache>/eval_bundle/`) holds `core.yaml` (a list `icl_tasks` of tasks with `label`,
`dataset_uri`, `num_fewshot` (a list; its first entry is used), `icl_task_type` and an optional
`continuation_delimiter`, default " "), the data in `eval_data/<dataset_uri>` (JSON lines), and
`eval_meta_data.csv`, whose `Random baseline` column gives each task's chance accuracy in percent, by
`Eval Task` label.

Each example becomes a few candidate texts, all preceded by `num_fewshot` solved examples of the same task
(drawn per example with a fixed seed from the whole task, never the example itself) separated by blank lines:
- multiple_choice (`query`, `choices`, `gold`): one text per choice, `query + delimiter + choice`. The same
  context, different continuations; the prediction is the choice with the lowest mean loss per token.
- schema (`context_options`, `continuation`, `gold`): one text per context, `context + delimiter +
  continuation`. Different contexts, the same continuation; the lowest mean loss of the continuation wins.
- language_modeling (`context`, `continuation`): correct when greedy decoding after the context reproduces
  every token of the continuation.
The scored tokens are found in token space: after the common prefix of the candidates (multiple choice,
language modeling) or within their common suffix (schema), so tokenization at the boundary never matters.
Texts longer than the model's context keep their last `max_seq_len` tokens.

centered = (accuracy - baseline/100) / (1 - baseline/100); CORE is the mean centered accuracy over tasks.
Examples are split across ranks (example i on rank i % world_size) and the counts summed with all_reduce.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from nanochat.configargs import UsageError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
BUNDLE_FIX = "fetch it with `bash scripts/download_data.sh`"
SHUFFLE_SEED = 1337  # the order examples are taken in, so --max-per-task picks the same subset every time
FEWSHOT_SEED = 1234
EXAMPLE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CoreTask:
    """One task of the bundle. `random_baseline` is chance accuracy in percent."""

    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float


@dataclass
class CoreResult:
    accuracy: dict[str, float] = field(default_factory=dict)
    centered: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)

    @property
    def core(self) -> float:
        return sum(self.centered.values()) / len(self.centered) if self.centered else float("nan")


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1."""
    chance = 0.01 * random_baseline_percent
    return (accuracy - chance) / (1.0 - chance)


def load_bundle(bundle_dir: Path) -> list[CoreTask]:
    """The tasks of `bundle_dir/core.yaml` with their random baselines; UsageError naming the fix if the
    bundle is missing or incomplete."""
    import yaml  # imported on use: only runs with a CORE bundle need PyYAML

    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise UsageError(f"the CORE eval bundle lacks {path}: {BUNDLE_FIX}")
    entries = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("icl_tasks") or []
    if not entries:
        raise UsageError(f"{config_path} lists no icl_tasks: {BUNDLE_FIX}")
    with open(meta_path, encoding="utf-8", newline="") as fh:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(fh)}
    tasks = []
    for entry in entries:
        label = entry["label"]
        if entry["icl_task_type"] not in TASK_TYPES:
            raise UsageError(f"CORE task {label} has the unknown type {entry['icl_task_type']!r}; "
                             f"expected one of {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UsageError(f"{meta_path} has no random baseline for {label}: {BUNDLE_FIX}")
        fewshot = entry.get("num_fewshot", [0])
        tasks.append(CoreTask(label=label, task_type=entry["icl_task_type"], dataset_uri=entry["dataset_uri"],
                              num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return tasks


def load_task_data(bundle_dir: Path, task: CoreTask) -> list[dict[str, Any]]:
    """The task's examples in the fixed shuffled order."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    if not path.is_file():
        raise UsageError(f"the CORE eval bundle lacks {path}: {BUNDLE_FIX}")
    with open(path, encoding="utf-8") as fh:
        data = [json.loads(line) for line in fh if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data


def fewshot_examples(data: Sequence[dict[str, Any]], index: int, count: int) -> list[dict[str, Any]]:
    """`count` other examples of the task, the same ones every time for a given index."""
    if count <= 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    picked = random.Random(FEWSHOT_SEED + index).sample(others, min(count, len(others)))
    return [data[i] for i in picked]


def render_candidates(item: dict[str, Any], task_type: str, delimiter: str,
                      fewshot: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The texts whose likelihoods decide one example (see the module docstring).

    For language_modeling: [context alone, context + continuation].
    """
    if task_type == "multiple_choice":
        shots = [f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}" for ex in fewshot]
        prefix = "".join(shot + EXAMPLE_SEPARATOR for shot in shots)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = [f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}" for ex in fewshot]
        prefix = "".join(shot + EXAMPLE_SEPARATOR for shot in shots)
        return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = [f"{ex['context'].strip()}{delimiter}{ex['continuation']}" for ex in fewshot]
        prefix = "".join(shot + EXAMPLE_SEPARATOR for shot in shots)
        # The context alone is stripped so a trailing space never sits at the end of the prompt, where it
        # would tokenize differently than inside the full text.
        context = f"{prefix}{item['context'].strip()}{delimiter}"
        return [context.strip(), context + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return shortest


def _common_suffix(sequences: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(s)) for s in sequences])


@dataclass
class _Scoring:
    """One example's sequences and, for each, the [start, end) token span whose likelihood is scored."""

    tokens: list[list[int]]
    spans: list[tuple[int, int]]
    task_type: str
    gold: int


def scored_spans(token_lists: Sequence[Sequence[int]], task_type: str) -> list[tuple[int, int]]:
    """The [start, end) span of each candidate's scored tokens. Every span starts after at least one token
    (the model needs a preceding token) and holds at least one token."""
    if task_type == "multiple_choice":
        start = _common_prefix(token_lists)
        start = max(1, min(start, min(len(t) for t in token_lists) - 1))
        return [(start, len(t)) for t in token_lists]
    if task_type == "schema":
        suffix = _common_suffix(token_lists)
        suffix = max(1, min(suffix, min(len(t) for t in token_lists) - 1))
        return [(len(t) - suffix, len(t)) for t in token_lists]
    if task_type == "language_modeling":
        context, full = token_lists
        start = max(1, min(_common_prefix([context, full]), len(full) - 1))
        return [(start, len(full))]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def prepare_example(tokenizer, data: Sequence[dict[str, Any]], index: int, task: CoreTask,
                    max_seq_len: int | None) -> _Scoring:
    item = data[index]
    texts = render_candidates(item, task.task_type, task.continuation_delimiter,
                              fewshot_examples(data, index, task.num_fewshot))
    token_lists = tokenizer.encode(texts, prepend=tokenizer.bos_id)
    spans = scored_spans(token_lists, task.task_type)
    if task.task_type == "language_modeling":
        token_lists = token_lists[1:]  # only the full text is run; the context alone located the span
    if max_seq_len is not None:
        cropped_tokens, cropped_spans = [], []
        for tokens, (start, end) in zip(token_lists, spans):
            cut = max(0, len(tokens) - max_seq_len)
            cropped_tokens.append(tokens[cut:])
            cropped_spans.append((max(1, start - cut), end - cut))
        token_lists, spans = cropped_tokens, cropped_spans
    return _Scoring(token_lists, spans, task.task_type, int(item.get("gold", 0)))


@torch.no_grad()
def _score_batch(model, batch: list[_Scoring], pad_id: int, device, autocast) -> list[bool]:
    """Run every sequence of the examples in `batch` as one right-padded forward pass; grade each example."""
    sequences = [t for example in batch for t in example.tokens]
    width = max(len(t) for t in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    ids = ids.to(device)
    with autocast() if autocast is not None else nullcontext():
        logits = model(ids)
    logits = logits.float()
    # Position t predicts token t+1: losses[:, t] is the loss of ids[:, t+1].
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    greedy = logits[:, :-1].argmax(dim=-1)
    outcomes, row = [], 0
    for example in batch:
        if example.task_type == "language_modeling":
            start, end = example.spans[0]
            outcomes.append(bool((greedy[row, start - 1:end - 1] == ids[row, start:end]).all()))
        else:
            mean_losses = [losses[row + i, start - 1:end - 1].mean().item()
                           for i, (start, end) in enumerate(example.spans)]
            outcomes.append(min(range(len(mean_losses)), key=mean_losses.__getitem__) == example.gold)
        row += len(example.tokens)
    return outcomes


def evaluate_task(model, tokenizer, data: Sequence[dict[str, Any]], task: CoreTask, device,
                  limit: int | None = None, batch_size: int = 32, max_seq_len: int | None = None,
                  rank: int = 0, world_size: int = 1, autocast: Callable | None = None,
                  show_progress: bool = False) -> float:
    """Accuracy on the first `limit` examples of `data` (all when None); few-shot examples come from all of
    `data`. This rank scores examples rank, rank + world_size, ... packed into forward passes of about
    `batch_size` sequences (whole examples, at least one per pass)."""
    count = len(data) if limit is None else min(limit, len(data))
    correct = total = 0
    pending: list[_Scoring] = []
    bar = tqdm(total=len(range(rank, count, world_size)), desc=task.label, leave=False,
               disable=not show_progress)

    def flush() -> None:
        nonlocal correct, total
        outcomes = _score_batch(model, pending, tokenizer.bos_id, device, autocast)
        correct += sum(outcomes)
        total += len(outcomes)
        bar.update(len(outcomes))
        pending.clear()

    for index in range(rank, count, world_size):
        example = prepare_example(tokenizer, data, index, task, max_seq_len)
        if pending and sum(len(p.tokens) for p in pending) + len(example.tokens) > batch_size:
            flush()
        pending.append(example)
    if pending:
        flush()
    bar.close()
    counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return correct / total if total else float("nan")


def evaluate_core(model, tokenizer, bundle_dir: Path, device, max_per_task: int = -1, batch_size: int = 32,
                  max_seq_len: int | None = None, rank: int = 0, world_size: int = 1,
                  autocast: Callable | None = None, show_progress: bool = False,
                  on_task: Callable[[CoreTask, float, float], None] | None = None) -> CoreResult:
    """Every task of the bundle; `max_per_task` > 0 scores that many examples of each (the first ones after
    the fixed shuffle). `on_task(task, accuracy, centered)` is called after each task."""
    tasks = load_bundle(bundle_dir)
    result = CoreResult()
    for task in tasks:
        data = load_task_data(bundle_dir, task)
        limit = max_per_task if max_per_task > 0 else None
        accuracy = evaluate_task(model, tokenizer, data, task, device, limit, batch_size, max_seq_len, rank,
                                 world_size, autocast, show_progress)
        result.accuracy[task.label] = accuracy
        result.centered[task.label] = centered_accuracy(accuracy, task.random_baseline)
        result.examples[task.label] = len(data) if limit is None else min(limit, len(data))
        if on_task is not None:
            on_task(task, accuracy, result.centered[task.label])
    return result
