"""Run one candidate: the real `scripts.base_train.main` in this process, then its trajectory event.

Each candidate trains in its own folder `<sweep dir>/<id>-p<phase>-s<steps>/`, a small cache of its own
whose `base_data` and `tokenizer` link to the real cache, so checkpoints and `report/base_train.json` of
parallel candidates never meet. The trainer's output goes to `train.log` there. Metrics come from the
report section (the loop state: loss and validation history, tokens seen, training seconds).

Exit statuses map to events: 0 -> `evaluated`; 3 (non-finite loss) -> `evaluated` with `diverged`; 75
(stopped by a signal after saving) -> `StoppedBySignal`, nothing recorded, so a rerun retries it; anything
else (2 usage error, 1 crash, out of memory) -> `failed` with the log's last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.sweep import trainer
from launch.sweep.trajectory import append_event
from nanochat.configargs import EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE, UsageError

LOG_TAIL_LINES = 20
SPIKE_FACTOR = 2.0
SPIKE_WARMUP_FRACTION = 0.1
CACHE_LINKS = ("base_data", "tokenizer")
TRAINER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)  # the trainer's StopRequest


class StoppedBySignal(RuntimeError):
    """The trainer saved and exited 75: stop the sweep; the candidate runs again on resume."""


@dataclass(frozen=True)
class CandidateTask:
    """Everything one candidate run needs; plain data, so submitit can ship it to a compute node."""

    candidate_id: str
    knobs: dict[str, Any]
    settings: dict[str, Any]  # menu-settable trainer settings (defaults < site < [fixed] < knobs)
    steps: int
    val_tokens: int
    phase: int
    sweep_dir: Path
    cache_dir: Path
    trajectory: Path
    environment: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the event (rung, phase-1 result, ...)
    attempt: int = 1  # 2, 3, ... when `--retry-failed` runs a failed candidate again

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / f"{self.candidate_id}-p{self.phase}-s{self.steps}"

    @property
    def run_key(self) -> tuple:
        """The trajectory's key for this run (`launch.sweep.trajectory.run_key`)."""
        return (self.phase, self.candidate_id, self.steps)

    def base_event(self) -> dict[str, Any]:
        return {"phase": self.phase, "id": self.candidate_id, "knobs": self.knobs, "steps": self.steps,
                "attempt": self.attempt, **self.extra}


def loss_spike(loss_history: list[list[float]], total_steps: int) -> str | None:
    """A loss above SPIKE_FACTOR x the running minimum after the first 10% of the steps, described; else None."""
    running_min = float("inf")
    start = max(1, int(SPIKE_WARMUP_FRACTION * total_steps))
    for step, loss in loss_history:
        if step > start and loss > SPIKE_FACTOR * running_min:
            return f"loss spike at step {step}: {loss:.3f} > {SPIKE_FACTOR:g} x running minimum {running_min:.3f}"
        running_min = min(running_min, loss)
    return None


def metrics_from_report(report: dict[str, Any], steps: int) -> dict[str, Any]:
    val = report.get("val_history") or []
    losses = report.get("loss_history") or []
    spike = loss_spike(losses, steps)
    return {
        "val_bpb": val[-1][1] if val else None,
        "unigram_bpb": val[-1][2] if val else None,
        "final_loss": losses[-1][1] if losses else None,
        "tokens_per_second": report.get("tokens_per_second"),
        "training_seconds": report.get("seconds"),
        "tokens_seen": report.get("tokens_seen"),
        "num_params": report.get("num_params"),
        "mfu_percent": report.get("mfu_percent"),
        "diverged": spike is not None,
        "divergence": spike,
        "val_history": val,
        "loss_history": losses,
    }


def stress_flags(metrics: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    """Phase-2 warnings: diverged although phase 1 did not, or ended worse than the phase-1 run."""
    if "phase1_val_bpb" not in extra:
        return []
    if metrics.get("diverged"):
        return [f"late divergence: {metrics.get('divergence')}"]
    if metrics.get("val_bpb") is not None and metrics["val_bpb"] > extra["phase1_val_bpb"]:
        return [f"worse than phase 1: val bpb {metrics['val_bpb']:.4f} after the longer run, "
                f"{extra['phase1_val_bpb']:.4f} after {extra['phase1_steps']} steps"]
    return []


def _prepare_run_dir(task: CandidateTask) -> Path:
    run_dir = task.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name in CACHE_LINKS:
        (run_dir / name).symlink_to(Path(task.cache_dir).resolve() / name, target_is_directory=True)
    return run_dir


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


def _peak_memory(torch) -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss (process high-water mark)"


def _device_name(torch, settings: dict[str, Any]) -> str:
    if settings.get("device_type") in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu" if settings.get("device_type") in ("auto", "cpu") else str(settings.get("device_type"))


def run_candidate(task: CandidateTask) -> dict[str, Any]:
    """Train the candidate for `task.steps` and describe the outcome as a trajectory event (not written)."""
    os.environ.update(task.environment)
    import torch  # after the stage environment is in place (OMP_NUM_THREADS, allocator settings)

    from scripts.base_train import main

    run_dir = _prepare_run_dir(task)
    log_path = run_dir / "train.log"
    settings = {**task.settings, **trainer.sweep_controlled_settings(task.steps, task.val_tokens, "sweep")}
    previous_base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    previous_handlers = {sig: signal.getsignal(sig) for sig in TRAINER_SIGNALS}
    os.environ["NANOCHAT_BASE_DIR"] = str(run_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    with open(log_path, "w", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            status = main(trainer.build_config(settings))
        except Exception as exc:  # a crash or refusal of one candidate is a result, not the sweep's end
            traceback.print_exc()
            status = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if previous_base_dir is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = previous_base_dir
    wall = time.monotonic() - started
    peak_mb, peak_kind = _peak_memory(torch)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    shutil.rmtree(run_dir / "base_checkpoints", ignore_errors=True)
    if status == EXIT_RESUMABLE:
        raise StoppedBySignal(f"candidate {task.candidate_id} stopped by a signal; rerun the sweep to resume")
    run = {"wall_seconds": round(wall, 3), "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": peak_kind,
           "device": _device_name(torch, task.settings), "devices": 1, "log": str(log_path)}
    if status in (EXIT_OK, EXIT_DIVERGED):
        if status == EXIT_OK:
            report = json.loads((run_dir / "report" / "base_train.json").read_text())
            metrics = {**metrics_from_report(report, task.steps), **run}
        else:
            metrics = {"val_bpb": None, "diverged": True, "divergence": "non-finite loss (base_train exit 3)", **run}
        return {"event": "evaluated", **task.base_event(), "metrics": metrics,
                "flags": stress_flags(metrics, task.extra)}
    return {"event": "failed", **task.base_event(), "exit_status": status, "log_tail": _tail(log_path), **run}


def run_and_record(task: CandidateTask) -> dict[str, Any]:
    """One SLURM array task: run the candidate, append its event under the file lock; the event back."""
    event = run_candidate(task)
    append_event(task.trajectory, event)
    return event
