"""Identity conversations: who the assistant is, from a user-editable JSONL file of {"messages": [...]}.

The default file is the cache's tasks/identity.jsonl (the demo corpus writes one); `--identity-file`
points a stage at another, e.g. one describing your own model. The same file serves every cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from nanochat.paths import base_dir, tasks_dir
from nanochat.tasks.base import Task
from nanochat.tasks.sources import JsonlFile

IDENTITY_FILE = "identity.jsonl"


def default_identity_file(root: Path | None = None) -> Path:
    return tasks_dir(root or base_dir()) / IDENTITY_FILE


class Identity(Task):
    name: ClassVar[str] = "identity"
    kind: ClassVar[str] = "generative"
    splits: ClassVar[tuple[str, ...]] = ("train",)
    hub_path: ClassVar[str] = ""

    def __init__(self, split: str = "train", path: Path | str | None = None, root: Path | None = None,
                 limit: int | None = None):
        file = Path(path) if path is not None else default_identity_file(root)
        fix = ("write one (a JSONL file of {\"messages\": [...]} conversations) and pass --identity-file, "
               "or leave identity conversations out with --identity-epochs 0")
        super().__init__(split, JsonlFile(file, fix), root, limit)

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(row, Mapping) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{self.source.description}: every line must be {{\"messages\": [...]}}, got {row!r:.80}")
        return {"messages": list(row["messages"])}
