"""Site profiles on disk: every `env/<name>.env` is a site; `.env.local` holds the user's own keys.

Files are python-dotenv files (`KEY=value`, `#` comments). Reading one checks every key against
`launch.keys`, so a misspelt key is an error naming the closest valid key, never a silent default; a line
that does not parse (an unclosed quote, a stray word) is an error naming the file and line, never skipped.
"""

from __future__ import annotations

from pathlib import Path

from launch.keys import check_known
from nanochat.configargs import UsageError
from nanochat.settings_file import read_settings_file

ENV_DIR_NAME = "env"
LOCAL_FILE_NAME = ".env.local"


def available_sites(repo_root: Path) -> list[str]:
    """Site names, one per `env/<name>.env`, sorted."""
    return sorted(path.stem for path in (repo_root / ENV_DIR_NAME).glob("*.env"))


def site_file(repo_root: Path, site: str) -> Path:
    """The profile of `site`; an unknown site is a UsageError listing the available ones."""
    path = repo_root / ENV_DIR_NAME / f"{site}.env"
    if not path.is_file():
        sites = ", ".join(available_sites(repo_root)) or "none"
        raise UsageError(f"unknown site {site!r}; available sites: {sites} (add one as env/{site}.env)")
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """The file's keys and raw values (no variable interpolation), every key checked against the schema."""
    values = read_settings_file(path)
    check_known(values, str(path))
    return values


def read_local_file(repo_root: Path) -> tuple[Path, dict[str, str]]:
    """`.env.local` in the repository root: its path and values ({} when the file does not exist)."""
    path = repo_root / LOCAL_FILE_NAME
    return path, (read_env_file(path) if path.is_file() else {})
