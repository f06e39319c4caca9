"""The task interface, and mixtures of tasks.

A `Task` is one split of one dataset seen as examples: dicts with `messages` (a conversation ready for
`Tokenizer.render_conversation`) plus whatever grading needs. Rows are read lazily from a `RowSource`, the
demo-corpus file when the cache holds the demo corpus (its `DEMO` manifest) and the hub dataset otherwise;
`require_available` reads every source up front so a stage fails before training, in one line.

`kind` is "categorical" for multiple choice (the answer is a letter) or "generative" (free text).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nanochat.configargs import UsageError
from nanochat.paths import base_dir, tasks_dir
from nanochat.tasks.sources import HF_CACHE_DIR, HubDataset, JsonlFile, MissingData, Rows, RowSource

DEMO_MANIFEST = "DEMO"


def is_demo_cache(root: Path) -> bool:
    return (Path(root) / DEMO_MANIFEST).is_file()


class Task(ABC):
    """One split of one dataset. Subclasses set the class attributes and `to_example`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    hub_path: ClassVar[str]

    def __init__(self, split: str, source: RowSource | None = None, root: Path | None = None,
                 limit: int | None = None):
        if split not in self.splits:
            raise ValueError(f"{self.name} has the splits {', '.join(self.splits)}, not {split!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        self.split = split
        self.limit = limit
        self.source = source or self.default_source(split, root or base_dir())
        self._rows: Rows | None = None

    def hub_config(self, split: str) -> str | None:
        return None

    def hub_split(self, split: str) -> str:
        return split

    def demo_file(self, split: str) -> str:
        return f"{self.name}_{split}.jsonl"

    def default_source(self, split: str, root: Path) -> RowSource:
        """The demo corpus's file in a demo cache, else the hub dataset in the cache's `hf/` folder."""
        if is_demo_cache(root):
            return JsonlFile(tasks_dir(root) / self.demo_file(split))
        return HubDataset(self.hub_path, self.hub_config(split), self.hub_split(split), Path(root) / HF_CACHE_DIR)

    @property
    def rows(self) -> Rows:
        if self._rows is None:
            self._rows = self.source.load()
        return self._rows

    def __len__(self) -> int:
        count = len(self.rows)
        return count if self.limit is None else min(count, self.limit)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name} [{self.split}] has {len(self)} examples, not index {index}")
        return self.to_example(self.rows[index])

    def examples(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    @abstractmethod
    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Map one row of the dataset as stored to an example."""

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        """Whether `completion` (the assistant's reply text) answers `example` correctly."""
        raise NotImplementedError(f"{self.name} has no automatic grader in this process")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, source={self.source.description!r})"


class TaskMixture:
    """All examples of several tasks in one deterministic shuffled order (same seed, same order).

    Listing a task twice includes its examples twice (an extra epoch of that task).
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0):
        if not tasks:
            raise ValueError("a mixture needs at least one task")
        self.tasks = list(tasks)
        self.seed = seed
        self._order: tuple[np.ndarray, np.ndarray] | None = None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None:
            lengths = [len(task) for task in self.tasks]
            task_ids = np.repeat(np.arange(len(self.tasks)), lengths)
            example_ids = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, np.int64)
            permutation = np.random.default_rng(self.seed).permutation(len(task_ids))
            self._order = (task_ids[permutation], example_ids[permutation])
        return self._order

    def __len__(self) -> int:
        return len(self._index()[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        task_ids, example_ids = self._index()
        return self.tasks[int(task_ids[index])][int(example_ids[index])]

    def examples(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]


class TaskSequence:
    """The examples of several tasks one task after the other, in order."""

    def __init__(self, tasks: Sequence[Task]):
        if not tasks:
            raise ValueError("a sequence needs at least one task")
        self.tasks = list(tasks)
        self._starts: list[int] | None = None

    def _offsets(self) -> list[int]:
        if self._starts is None:
            starts, total = [], 0
            for task in self.tasks:
                starts.append(total)
                total += len(task)
            self._starts = starts + [total]
        return self._starts

    def __len__(self) -> int:
        return self._offsets()[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        starts = self._offsets()
        if not 0 <= index < starts[-1]:
            raise IndexError(f"the sequence has {starts[-1]} examples, not index {index}")
        which = bisect.bisect_right(starts, index) - 1
        return self.tasks[which][index - starts[which]]

    def examples(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]


def _leaf_tasks(items: Iterable[Task | TaskMixture | TaskSequence]) -> list[Task]:
    leaves: list[Task] = []
    for item in items:
        for task in (item.tasks if isinstance(item, (TaskMixture, TaskSequence)) else [item]):
            if all(task is not seen for seen in leaves):
                leaves.append(task)
    return leaves


def require_available(items: Iterable[Task | TaskMixture | TaskSequence]) -> None:
    """Read every task's rows now; raise one UsageError listing everything missing and how to get it."""
    missing: dict[str, list[str]] = {}
    for task in _leaf_tasks(items):
        try:
            _ = task.rows
        except MissingData as exc:
            missing.setdefault(exc.fix, []).append(exc.what)
    if missing:
        raise UsageError("; ".join(f"missing {', '.join(whats)}: {fix}" for fix, whats in missing.items()))
