"""Launch logs: `logs/<site>/<launch-id>/<stage>.log` (the stage's output) and `launch.log`, one greppable
line per event, e.g. `2026-11-21T19:02:03 stage=base_train event=end status=0 seconds=212.4`.

Writes go straight to file descriptors (os.write), so they are safe from signal handlers that run while
the main loop is itself writing.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
from pathlib import Path

from launch.slurm_env import SlurmJob

LAUNCH_LOG_NAME = "launch.log"


def new_launch_id(job: SlurmJob | None = None) -> str:
    """The SLURM job id inside a job (a requeued job appends to the same folder), else time and pid."""
    if job is not None:
        return job.job_id
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"


def launch_dir(logs_root: Path, site: str, launch_id: str) -> Path:
    return logs_root / site / launch_id


def append_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def event_line(**fields: object) -> str:
    """`<time> key=value ...`; values with spaces or quotes are shell-quoted so the line stays one line."""
    parts = [f"{dt.datetime.now():%Y-%m-%dT%H:%M:%S}"]
    for name, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f"{name}={shlex.quote(text) if text else repr('')}")
    return " ".join(parts)


class LaunchLog:
    """The launch's event log; `enabled=False` (other nodes of a multi-node job) writes nothing."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory = directory
        self.path = directory / LAUNCH_LOG_NAME
        self.enabled = enabled
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)

    def event(self, **fields: object) -> None:
        if self.enabled:
            append_bytes(self.path, (event_line(**fields) + "\n").encode())

    def stage_log(self, stage: str, node_rank: int = 0, num_nodes: int = 1) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        suffix = f".node{node_rank}" if num_nodes > 1 else ""
        return self.directory / f"{stage}{suffix}.log"
