"""Atomic, self-describing checkpoints: a checkpoint exists only once its meta file exists and matches.

Layout in `<phase>_checkpoints/<tag>/`: `model_<step>.pt` (rank 0), `optim_<step>_rank<r>.pt` (every rank),
`meta_<step>.json` (rank 0, written last). Every file is written to a temporary name, fsynced, renamed, and
the directory fsynced. The meta records each file's size, so a truncated file (a kill during a copy, a full
disk) makes the whole checkpoint invisible instead of half-loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanochat.configargs import UsageError

_META_RE = re.compile(r"^meta_(\d+)\.json$")
_STEP_RE = re.compile(r"^(?:meta|model|optim)_(\d+)[._]")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_torch_save(obj: Any, path: Path) -> int:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _atomic_json_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def model_path(directory: Path, step: int) -> Path:
    return directory / f"model_{step:06d}.pt"


def optim_path(directory: Path, step: int, rank: int) -> Path:
    return directory / f"optim_{step:06d}_rank{rank}.pt"


def meta_path(directory: Path, step: int) -> Path:
    return directory / f"meta_{step:06d}.json"


def save_checkpoint(directory: Path, step: int, model_state: dict, optim_state: dict | None, meta: dict,
                    rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] = lambda: None, keep: int = 0) -> None:
    """Write one checkpoint. Every rank calls this; rank 0 writes the model and, after all ranks have
    written their optimizer shards (`barrier`), the meta file that makes the checkpoint visible. With
    `keep` > 0, rank 0 then deletes all but the newest `keep` complete checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optim_state is not None:
        _atomic_torch_save(optim_state, optim_path(directory, step, rank))
    if rank == 0:
        _atomic_torch_save(model_state, model_path(directory, step))
    barrier()
    if rank == 0:
        files = {model_path(directory, step).name: model_path(directory, step).stat().st_size}
        if optim_state is not None:
            for r in range(world_size):
                p = optim_path(directory, step, r)
                files[p.name] = p.stat().st_size
        _atomic_json_save({**meta, "step": step, "world_size": world_size, "files": files},
                          meta_path(directory, step))
        _fsync_dir(directory)
        if keep > 0:
            prune_checkpoints(directory, keep)
    barrier()


def read_meta(directory: Path, step: int) -> dict | None:
    """The meta of a complete checkpoint, or None if the checkpoint is missing, partial or corrupt."""
    path = meta_path(Path(directory), step)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or meta.get("step") != step:
        return None
    for name, size in files.items():
        candidate = Path(directory) / name
        if not candidate.is_file() or candidate.stat().st_size != size:
            return None
    return meta


def complete_steps(directory: Path) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _META_RE.match(p.name))]
    return sorted(s for s in steps if read_meta(directory, s) is not None)


def latest_complete_step(directory: Path) -> int | None:
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def load_checkpoint(directory: Path, step: int, device: torch.device | str, rank: int = 0,
                    load_optimizer: bool = True) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state for this rank or None, meta); ValueError if the checkpoint is not complete."""
    directory = Path(directory)
    meta = read_meta(directory, step)
    if meta is None:
        raise ValueError(f"no complete checkpoint at step {step} in {directory}")
    model_state = _load(model_path(directory, step), meta_path(directory, step), device, weights_only=True)
    optim_state = None
    if load_optimizer:
        optim_state = _load(optim_path(directory, step, rank), meta_path(directory, step), device, weights_only=False)
    return model_state, optim_state, meta


def _load(path: Path, meta: Path, device: torch.device | str, weights_only: bool) -> Any:
    """torch.load, with a file that has the recorded size but not a checkpoint's contents (zeroed by a crash,
    damaged on disk) a UsageError naming it and the way back to the previous checkpoint."""
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, tarfile.TarError) as exc:
        reason = str(exc).split("\n")[0].split(". ")[0] or type(exc).__name__  # torch's advice after it misleads
        raise UsageError(f"{path} is not a readable checkpoint file ({reason}); delete {meta} to fall back to "
                         "the checkpoint before it, or train again") from exc


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporary files left by a writer that was killed mid-save; returns how many were removed.

    Every one, with no check that its writer is gone (unlike `nanochat.leftovers`): a run owns its tag's
    folder and calls this on rank 0 before its ranks meet at a barrier, so nobody is writing there yet, and
    a killed multi-node job's optimizer shards (gigabytes) need not wait for an age limit."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def prune_checkpoints(directory: Path, keep: int) -> list[int]:
    """Keep the newest `keep` complete checkpoints (and any newer partial ones); delete older files."""
    steps = complete_steps(directory)
    doomed = steps[:-keep] if keep > 0 else []
    _delete(directory, doomed)
    return doomed


def remove_checkpoints(directory: Path) -> list[int]:
    """Delete every checkpoint in `directory`, partial ones too (a run that starts over replaces them: left
    there, a higher step of the old run would pass for the newest checkpoint); the complete steps removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = complete_steps(directory)
    _delete(directory, sorted({int(m.group(1)) for p in directory.iterdir() if (m := _STEP_RE.match(p.name))}))
    return steps


def _delete(directory: Path, steps: list[int]) -> None:
    for step in steps:
        meta_path(directory, step).unlink(missing_ok=True)  # first: the checkpoint stops existing at once
        for p in Path(directory).glob(f"*_{step:06d}*.pt"):
            p.unlink(missing_ok=True)


def latest_tag(phase_dir: Path) -> str | None:
    """The tag folder with the most recently written complete checkpoint."""
    phase_dir = Path(phase_dir)
    if not phase_dir.is_dir():
        return None
    best: tuple[float, str] | None = None
    for tag_dir in phase_dir.iterdir():
        step = latest_complete_step(tag_dir) if tag_dir.is_dir() else None
        if step is None:
            continue
        mtime = meta_path(tag_dir, step).stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, tag_dir.name)
    return best[1] if best else None
