"""Where a task's rows come from: a demo-corpus JSONL file, a hub dataset in the cache, or local data files.

Every source returns the rows as the real dataset stores them (a list, or a memory-mapped `datasets.Dataset`
with the same length and indexing); the task modules map rows to conversations. Nothing is read until
`load()` is called, and a source that cannot be read raises `MissingData`, a `UsageError` naming the fix.
Hub datasets are read with `datasets.load_dataset(..., cache_dir=<cache>/hf)`; with HF_HUB_OFFLINE=1 or
HF_DATASETS_OFFLINE=1 a dataset that is not in the cache is reported, never fetched.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.configargs import UsageError

DOWNLOAD_FIX = "run `bash scripts/download_data.sh` on a machine with internet"
DEMO_FIX = "write the demo corpus with `python -m scripts.demo_data`"
HF_CACHE_DIR = "hf"

Rows = Sequence[Mapping[str, Any]]


class MissingData(UsageError):
    """A task's rows cannot be read. `what` names the data, `fix` how to get it."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} is missing: {fix}")
        self.what = what
        self.fix = fix


class RowSource(ABC):
    """The rows of one split of one dataset."""

    @property
    @abstractmethod
    def description(self) -> str: ...

    @abstractmethod
    def load(self) -> Rows: ...

    def files(self) -> list[Path]:
        """The local files the rows are read from (for fingerprints of what an evaluation measured); a hub
        dataset has none: its name, config and split identify it."""
        return []


@dataclass(frozen=True)
class JsonlFile(RowSource):
    """One JSON object per line (the demo corpus's task files, the identity conversations)."""

    path: Path
    fix: str = DEMO_FIX

    @property
    def description(self) -> str:
        return str(self.path)

    def files(self) -> list[Path]:
        return [Path(self.path)]

    def load(self) -> Rows:
        if not Path(self.path).is_file():
            raise MissingData(str(self.path), self.fix)
        rows = []
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise UsageError(f"{self.path}:{number} is not valid JSON ({exc}); fix or replace the file") from exc
        return rows


def hub_offline() -> bool:
    """Whether the HF libraries were told not to touch the network."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@dataclass(frozen=True)
class HubDataset(RowSource):
    """A dataset of the HF hub as fetched into the cache by the offline-data step."""

    path: str
    config: str | None
    split: str
    cache_dir: Path

    @property
    def description(self) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"{self.path}{config} [{self.split}]"

    def load(self) -> Rows:
        from datasets import load_dataset  # imported on use: `datasets` is slow to import

        try:
            return load_dataset(self.path, self.config, split=self.split, cache_dir=str(self.cache_dir))
        except OSError as exc:
            where = "offline and not" if hub_offline() else "not"
            raise MissingData(f"{self.description} ({where} in {self.cache_dir}: {type(exc).__name__})",
                              DOWNLOAD_FIX) from exc


@dataclass(frozen=True)
class LocalDataFiles(RowSource):
    """Files in a hub dataset's stored format (parquet or json lines), read with the `datasets` builders."""

    builder: str
    data_files: tuple[str, ...]
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.builder not in ("parquet", "json"):
            raise ValueError(f"builder must be 'parquet' or 'json', not {self.builder!r}")

    @property
    def description(self) -> str:
        return ", ".join(self.data_files)

    def files(self) -> list[Path]:
        return [Path(f) for f in self.data_files]

    def load(self) -> Rows:
        from datasets import load_dataset

        missing = [f for f in self.data_files if not Path(f).is_file()]
        if missing:
            raise MissingData(", ".join(missing), "check the --data-files paths")
        cache_dir = str(self.cache_dir) if self.cache_dir is not None else None
        return load_dataset(self.builder, data_files=list(self.data_files), split="train", cache_dir=cache_dir)
