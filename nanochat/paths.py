"""Where things live in the cache ($NANOCHAT_BASE_DIR); every path is computed when asked, never at import."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE_DIR = Path.home() / ".cache" / "nanochat"
PHASES = ("base", "mid", "chatsft", "chatrl")


def base_dir() -> Path:
    """The cache root: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    value = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(value).expanduser() if value else DEFAULT_BASE_DIR


def data_dir(root: Path | None = None) -> Path:
    return (root or base_dir()) / "base_data"


def tokenizer_dir(root: Path | None = None) -> Path:
    return (root or base_dir()) / "tokenizer"


def tasks_dir(root: Path | None = None) -> Path:
    return (root or base_dir()) / "tasks"


def report_dir(root: Path | None = None) -> Path:
    return (root or base_dir()) / "report"


def checkpoint_dir(phase: str, tag: str, root: Path | None = None) -> Path:
    if phase not in PHASES:
        raise ValueError(f"unknown checkpoint phase {phase!r}; expected one of {', '.join(PHASES)}")
    return (root or base_dir()) / f"{phase}_checkpoints" / tag


def shard_paths(directory: Path) -> list[Path]:
    """Parquet shards in name order; by convention the last one is the validation shard."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))
