"""Report sections: each stage writes report/<stage>.json atomically; report.md is assembled from them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nanochat.paths import report_dir


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_section(stage: str, data: dict[str, Any], root: Path | None = None) -> Path:
    """Record one stage's results (settings, metrics, timings) as report/<stage>.json."""
    section = {"stage": stage, "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    path = report_dir(root) / f"{stage}.json"
    atomic_write_text(path, json.dumps(section, indent=2, default=str) + "\n")
    return path


def read_sections(root: Path | None = None) -> dict[str, dict[str, Any]]:
    directory = report_dir(root)
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
