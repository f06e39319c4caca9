"""trajectory.jsonl: the sweep's append-only record, one JSON object per line, safe under kill and concurrency.

Events: `header` (what the sweep is), `evaluated` (a candidate's metrics), `rejected` (knobs and the reason
it never ran), `failed` (exit status and the last log lines), `finished` (a summary). Every event carries
`phase` (1: the proxy sweep, 2: the finalists' stress test). Runs carry `attempt` (1 unless a failed run
was retried with `--retry-failed`); a run's outcome is its latest record (`run_outcomes`).

Two locks. The sweep holds an exclusive `flock` on `<file>.lock` for its whole life, so a second sweep on
the same file is refused (`SweepLock`). Every writer (the sweep, or a SLURM array task on a compute node)
takes an exclusive `flock` on the file itself around each append; under it, a torn last line (a writer
killed mid-write) is cut off, a candidate already recorded is not written twice, and the line goes out in
one `os.write`, then fsync. flock works across nodes on NFSv4 and Lustre/GPFS mounted with locking.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanochat.configargs import UsageError

RECORD_EVENTS = ("evaluated", "rejected", "failed")


def run_key(event: dict[str, Any]) -> tuple | None:
    """Which run a record is about: the candidate, its phase and, for runs, its step budget."""
    if event.get("event") not in RECORD_EVENTS:
        return None
    steps = None if event["event"] == "rejected" else event.get("steps")
    return (event.get("phase", 1), event["id"], steps)


def record_key(event: dict[str, Any]) -> tuple | None:
    """What makes a record unique: its run and, for a failure, the attempt (a retry may fail again)."""
    key = run_key(event)
    if key is None or event["event"] != "failed":
        return key
    return (*key, event.get("attempt", 1))


def run_outcomes(events: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Each run's latest record, by `run_key`: a retried run's later record supersedes its failure."""
    return {key: e for e in events if (key := run_key(e)) is not None}


def failed_attempts(events: list[dict[str, Any]], key: tuple) -> int:
    return sum(1 for e in events if e.get("event") == "failed" and run_key(e) == key)


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """Events of complete lines; a last line without its newline is a torn write and is ignored."""
    events = []
    complete = data[:data.rfind(b"\n") + 1]
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[sweep] warning: line {number} of the trajectory is not JSON; ignored", file=sys.stderr)
    return events


def _not_a_folder(path: Path) -> None:
    if Path(path).is_dir():
        raise UsageError(f"{path} is a folder; name the trajectory file (e.g. {Path(path) / 'trajectory.jsonl'})")


def read_events(path: Path) -> list[dict[str, Any]]:
    _not_a_folder(path)
    try:
        return parse_lines(Path(path).read_bytes())
    except FileNotFoundError:
        return []


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def check_is_trajectory(path: Path) -> None:
    """UsageError unless `path` is missing, empty or starts with a sweep header line (or a torn one): a sweep
    must never cut or append to someone else's file given as --out."""
    _not_a_folder(path)
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
    except FileNotFoundError:
        return
    if not first:
        return
    if first.endswith(b"\n"):
        try:
            event = json.loads(first)
        except json.JSONDecodeError:
            event = None
        header = isinstance(event, dict) and event.get("event") == "header"
    else:  # a header torn by a kill during the sweep's first write
        header = first.replace(b" ", b"").startswith(b'{"event":"header"')
    if not header:
        raise UsageError(f"{path} exists and is not a sweep trajectory (its first line is not a sweep header); "
                         "pass another --out")


def repair(path: Path) -> int:
    """Cut a torn last line off the file; the number of bytes removed."""
    with _locked(path) as fd:
        return _cut_torn_tail(fd)


def _cut_torn_tail(fd: int) -> int:
    data = _read_all(fd)
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return len(data) - keep


def append_event(path: Path, event: dict[str, Any]) -> bool:
    """Append `event` as one line; False (nothing written) when its candidate record is already there."""
    line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
    key = record_key(event)
    with _locked(Path(path)) as fd:
        _cut_torn_tail(fd)
        if key is not None and any(record_key(e) == key for e in parse_lines(_read_all(fd))):
            return False
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    return True


class SweepLock:
    """Exclusive for the sweep's lifetime; a second sweep on the same trajectory gets a UsageError (exit 2)."""

    def __init__(self, trajectory: Path):
        self.path = Path(f"{trajectory}.lock")
        self.fd: int | None = None

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UsageError(f"another sweep ({holder}) is writing {self.path.with_suffix('')}; wait for it to "
                             "finish or pass a different --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
