"""Where things live in the cache ($NANOCHAT_BASE_DIR); every path is computed when asked, never at import."""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping
from pathlib import Path

from nanochat.configargs import UsageError

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


def phase_dir(phase: str, root: Path | None = None) -> Path:
    """<cache>/<phase>_checkpoints, the folder of a phase's tags."""
    if phase not in PHASES:
        raise ValueError(f"unknown checkpoint phase {phase!r}; expected one of {', '.join(PHASES)}")
    return (root or base_dir()) / f"{phase}_checkpoints"


def check_model_tag(tag: str) -> None:
    """UsageError unless `tag` is one folder name: with `a/b` or `..` checkpoints would land outside their
    phase's folder, where no later stage finds them."""
    if tag in ("", ".", "..") or "/" in tag or os.sep in tag or "\0" in tag:
        raise UsageError(f"--model-tag {tag!r} is not a folder name; use letters, digits, '-', '_' or '.' "
                         "(e.g. d20 or d20-long)")


def checkpoint_dir(phase: str, tag: str, root: Path | None = None) -> Path:
    """<cache>/<phase>_checkpoints/<tag> (`check_model_tag` first)."""
    check_model_tag(tag)
    return phase_dir(phase, root) / tag


def shard_paths(directory: Path) -> list[Path]:
    """Parquet shards in name order; by convention the last one is the validation shard."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def expand_path(text: str, environ: Mapping[str, str]) -> Path:
    """Expand $VAR / ${VAR} from `environ` ($USER falls back to the login name) and a leading ~, the way a
    shell would for a path written in a site file; an unset variable is a UsageError."""
    from nanochat.configargs import UsageError

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name == "USER" and not environ.get("USER"):
            return getpass.getuser()
        if name not in environ:
            raise UsageError(f"the path {text!r} uses ${name}, which is not set")
        return environ[name]

    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, text)
    if expanded.startswith("~"):
        expanded = (environ.get("HOME") or str(Path.home())) + expanded[1:]
    return Path(expanded)
