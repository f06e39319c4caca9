"""Tasks: datasets seen as conversations for training and as graded examples for evaluation.

`make_task(name, split, ...)` builds one from the registry `TASKS`; `TaskMixture` / `TaskSequence` combine
them; `require_available` checks that all their data can be read before a stage starts work.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.arc import ARCChallenge, ARCEasy
from nanochat.tasks.base import Task, TaskMixture, TaskSequence, is_demo_cache, require_available
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.sources import HubDataset, JsonlFile, LocalDataFiles, MissingData, RowSource

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SmolTalk, MMLU, ARCEasy, ARCChallenge, GSM8K,
                                                           HumanEval, Identity)}


def make_task(name: str, split: str, root: Path | None = None, limit: int | None = None) -> Task:
    """The registered task `name` on `split`, reading the cache at `root` (default: $NANOCHAT_BASE_DIR)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](split, root=root, limit=limit)


__all__ = ["TASKS", "make_task", "Task", "TaskMixture", "TaskSequence", "require_available", "is_demo_cache",
           "SmolTalk", "MMLU", "ARCEasy", "ARCChallenge", "GSM8K", "HumanEval", "Identity", "RowSource",
           "JsonlFile", "HubDataset", "LocalDataFiles", "MissingData"]
