"""Temporaries of killed writers: named after their host and process, removed by the next run that writes there.

A writer that replaces something atomically builds it under a hidden sibling named by `temp_name`,
`.<final name>.<kind>-<host>-<pid>` (kind: `tmp` for a file or folder being written, `extract` for an
archive being unpacked, `old` for the replaced version on its way out), then renames it into place. A kill
in between leaves the sibling behind; `remove_leftovers` (called by the next run of the same stage) removes
the ones whose writer is gone:
- named for this host: when its process id no longer exists here (a live one's, or one reusing its id, are
  kept however old);
- from another host (a node sharing the filesystem, where the process id says nothing) or from before the
  host was part of the name: only once nothing in it has changed for STALE_AFTER_SECONDS. A live writer
  creates its temporary and writes into it until the rename, so it never looks that old; an `old` folder
  keeps the replaced version's times, but its writer removes it just after the rename and tolerates
  finding it gone.
This assumes one host name means one process namespace (containers that share a host name and a cache
should not keep their process ids apart).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import socket
import time
from pathlib import Path

STALE_AFTER_SECONDS = 3600.0
KINDS = ("tmp", "old", "extract")
# `.<final>.<kind>-<host>-<pid>`; the earlier `.<final>.tmp<pid>` and `.<final>.<kind>-<pid>` have no host
LEFTOVER = re.compile(rf"^\.(?P<final>.+)\.(?P<kind>{'|'.join(KINDS)})(?:-(?P<host>.+)-|-?)(?P<pid>\d+)$")


def temp_name(final: str, kind: str = "tmp") -> str:
    """The hidden name under which this process writes `final` (a sibling in the same folder)."""
    assert kind in KINDS, kind
    return f".{final}.{kind}-{socket.gethostname()}-{os.getpid()}"


def remove_leftovers(directory: Path, final_pattern: str, now: float | None = None) -> list[str]:
    """Remove the temporaries in `directory` of killed writers of names matching `final_pattern` (fnmatch);
    returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for path in sorted(directory.iterdir()):
        match = LEFTOVER.match(path.name)
        if match and fnmatch.fnmatchcase(match["final"], final_pattern) and _writer_gone(path, match, now):
            _remove(path)
            removed.append(path.name)
    return removed


def _writer_gone(path: Path, match: re.Match, now: float) -> bool:
    if match["host"] == socket.gethostname():
        return not _process_exists(int(match["pid"]))
    try:
        return now - _last_change(path) >= STALE_AFTER_SECONDS
    except FileNotFoundError:  # renamed into place or removed by its writer meanwhile
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
