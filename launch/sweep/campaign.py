"""The sweep itself: choose candidates, reject the invalid ones, run the rest, record everything; resume.

Phase 1 (`--menu`): the strategy's candidates, each screened by the menu's constraints and base_train's
own validation, then run for `--steps` (successive halving: rung by rung). Phase 2 (`--finalists K
--from FILE`): the K best phase-1 candidates (non-diverged, lowest validation bits per byte at their
largest budget) again for `--steps`, flagged when they diverge late or end worse than in phase 1.

Resuming is rerunning the same command: the trajectory's header must match, the torn tail of a killed
write is cut off, and every candidate already evaluated, rejected or failed is skipped; with
`retry_failed` the failed ones run again (attempt 2, 3, ...) and their new record supersedes the failure.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launch.config import LaunchConfig
from launch.sweep import trainer
from launch.sweep.candidates import Candidate, order_by_shape, rejection_reason
from launch.sweep.executors import SweepExecutor
from launch.sweep.menu import Menu
from launch.sweep.strategies import halving_budgets, initial_candidates, survivors
from launch.sweep.trajectory import (
    append_event,
    check_is_trajectory,
    failed_attempts,
    read_events,
    repair,
    run_key,
    run_outcomes,
)
from launch.sweep.worker import CandidateTask
from nanochat import paths
from nanochat.configargs import UsageError

HEADER_MATCH_KEYS = ("phase", "menu", "strategy", "seed", "steps", "candidates", "val_tokens", "eta", "site",
                     "finalists", "base_settings")
SITE_SETTINGS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size",
                 "window_pattern", "precision", "compile")


@dataclass(frozen=True)
class SweepPlan:
    """A resolved sweep: what to run, where, and where to record it."""

    phase: int
    config: LaunchConfig
    out: Path
    sweep_dir: Path
    steps: int
    val_tokens: int
    base_settings: dict[str, Any]
    header: dict[str, Any]


def code_version(repo_root: Path) -> str:
    """`git` commit of the checkout, with `+dirty` when files differ from it ('unknown' outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def default_sweep_dir(cache_dir: Path, out: Path) -> Path:
    digest = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]
    return cache_dir / "sweeps" / f"{out.stem}-{digest}"


def corpus_problem(config: LaunchConfig) -> str | None:
    """The missing piece of the cache the candidates train on, with the command that makes it, or None."""
    root, site = config.site.cache_dir, config.site.name
    shards = paths.shard_paths(paths.data_dir(root))
    tokenizer = paths.tokenizer_dir(root)
    if config.site.data == "demo":
        fix = f"python -m launch --site {site} --stages demo_data,tok_train"
    else:
        fix = f"bash scripts/download_data.sh --site {site} and python -m launch --site {site} --stages tok_train"
    if len(shards) < 2:
        return f"{paths.data_dir(root)} has {len(shards)} parquet shards (2 needed: train + val); run: {fix}"
    if not ((tokenizer / "tokenizer.json").is_file() and (tokenizer / "token_bytes.pt").is_file()):
        return f"no trained tokenizer in {tokenizer}; run: {fix}"
    return None


def vocab_size(config: LaunchConfig) -> int:
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.load(paths.tokenizer_dir(config.site.cache_dir)).vocab_size


def base_settings(config: LaunchConfig, menu: Menu) -> dict[str, Any]:
    """Trainer defaults < the site's model settings < the menu's [fixed]."""
    settings = trainer.trainer_defaults()
    for name in SITE_SETTINGS:
        value = getattr(config.run, name)
        if value is not None:
            settings[name] = value
    settings["device_type"] = config.site.device_type
    settings.update(menu.fixed)
    return settings


class RunsMissing(RuntimeError):
    """Runs the executor returned from without recording them (an array task killed by its time limit, a node
    failure, scancel): the sweep is not finished; rerunning the same command runs them."""


class Sweep:
    """Runs a plan against its trajectory file (the caller holds the SweepLock)."""

    def __init__(self, plan: SweepPlan, executor: SweepExecutor, out=sys.stderr, retry_failed: bool = False):
        self.plan = plan
        self.executor = executor
        self.out = out
        self.retry_failed = retry_failed
        self.written = 0

    def say(self, text: str) -> None:
        print(f"[sweep] {text}", file=self.out, flush=True)

    def open(self) -> list[dict[str, Any]]:
        """Cut a torn tail, check the header (write it on a new file); the events so far."""
        check_is_trajectory(self.plan.out)
        cut = repair(self.plan.out)
        if cut:
            self.say(f"cut a torn last line ({cut} bytes) off {self.plan.out}")
        events = read_events(self.plan.out)
        headers = [e for e in events if e.get("event") == "header" and e.get("phase") == self.plan.phase]
        if headers:
            old, new = headers[0], self.plan.header
            differs = [k for k in HEADER_MATCH_KEYS if old.get(k) != new.get(k)]
            if differs:
                raise UsageError(f"{self.plan.out} holds a phase-{self.plan.phase} sweep with different "
                                 f"{', '.join(differs)}; rerun it with its own settings or pass another --out")
            done = sum(1 for key in run_outcomes(events) if key[0] == self.plan.phase)
            self.say(f"resuming {self.plan.out}: {done} candidate records already there")
        else:
            self.record(self.plan.header)
        return events

    def record(self, event: dict[str, Any]) -> None:
        if append_event(self.plan.out, event):
            self.written += 1
            self.announce(event)

    def announce(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "header":
            return
        knobs = ", ".join(f"{k}={v}" for k, v in event.get("knobs", {}).items())
        if kind == "rejected":
            self.say(f"rejected {event['id']} ({knobs}): {event['reason']}")
        elif kind == "failed":
            self.say(f"failed   {event['id']} ({knobs}): exit {event['exit_status']}, log {event.get('log')}")
        elif kind == "evaluated":
            m = event["metrics"]
            bpb = "diverged" if m.get("val_bpb") is None else f"val bpb {m['val_bpb']:.4f}"
            rate = f", {m['tokens_per_second']:,.0f} tok/s" if m.get("tokens_per_second") else ""
            flag = f" [{m['divergence']}]" if m.get("diverged") and m.get("val_bpb") is not None else ""
            self.say(f"{'evaluated':9s}{event['id']} ({knobs}), {event['steps']} steps: {bpb}{rate}, "
                     f"{m['wall_seconds']:.1f} s{flag}")

    def task(self, candidate: Candidate, steps: int, extra: dict[str, Any] | None = None) -> CandidateTask:
        plan = self.plan
        return CandidateTask(candidate.id, candidate.knobs, candidate.settings(plan.base_settings), steps,
                             plan.val_tokens, plan.phase, plan.sweep_dir, plan.config.site.cache_dir, plan.out,
                             dict(plan.config.stage_env), extra or {})

    def run_tasks(self, tasks: Sequence[CandidateTask]) -> None:
        events = read_events(self.plan.out)
        outcomes = run_outcomes(events)
        todo = []
        for task in tasks:
            if task.run_key not in outcomes:
                todo.append(task)
            elif self.retry_failed and outcomes[task.run_key]["event"] == "failed":
                todo.append(replace(task, attempt=failed_attempts(events, task.run_key) + 1))
        if len(todo) < len(tasks):
            self.say(f"{len(tasks) - len(todo)} of {len(tasks)} runs already recorded; running {len(todo)}")
        retried = sum(task.attempt > 1 for task in todo)
        if retried:
            self.say(f"retrying {retried} failed run{'s' if retried > 1 else ''}")
        self.executor.run(todo, self.announce)
        outcomes = run_outcomes(read_events(self.plan.out))
        missing = [t.candidate_id for t in todo
                   if t.run_key not in outcomes or outcomes[t.run_key].get("attempt", 1) < t.attempt]
        if missing:
            raise RunsMissing(f"{len(missing)} of {len(todo)} runs ended without a record ({', '.join(missing)}); "
                              "see their logs, then rerun the same command to run them")

    def results(self, steps: int) -> dict[str, dict[str, Any]]:
        """This phase's records at `steps` (evaluated and failed), by candidate id."""
        return {key[1]: e for key, e in run_outcomes(read_events(self.plan.out)).items()
                if key[0] == self.plan.phase and key[2] == steps}

    def finish(self, started: datetime.datetime) -> None:
        events = [e for e in read_events(self.plan.out) if e.get("phase") == self.plan.phase]
        last_record = max((i for i, e in enumerate(events) if run_key(e)), default=-1)
        if any(e.get("event") == "finished" for e in events[last_record + 1:]):
            return
        outcomes = list(run_outcomes(events).values())
        evaluated = [e for e in outcomes if e.get("event") == "evaluated"]
        ok = [e for e in evaluated if not e["metrics"].get("diverged") and e["metrics"].get("val_bpb") is not None]
        best = min(ok, key=lambda e: (-e["steps"], e["metrics"]["val_bpb"]), default=None)
        summary = {
            "evaluated": len(evaluated), "diverged": len(evaluated) - len(ok),
            "rejected": sum(e.get("event") == "rejected" for e in outcomes),
            "failed": sum(e.get("event") == "failed" for e in outcomes),
            "device_seconds": round(sum((e.get("metrics") or e).get("wall_seconds", 0.0)
                                        for e in events if e.get("event") in ("evaluated", "failed")), 1),
            "best": {"id": best["id"], "val_bpb": best["metrics"]["val_bpb"], "knobs": best["knobs"]} if best else None,
        }
        self.record({"event": "finished", "phase": self.plan.phase, "summary": summary,
                     "session_started_at": started.isoformat(timespec="seconds"),
                     "finished_at": now().isoformat(timespec="seconds")})
        self.say(f"phase {self.plan.phase} finished: {summary['evaluated']} evaluated ({summary['diverged']} "
                 f"diverged), {summary['rejected']} rejected, {summary['failed']} failed; best "
                 + (f"{best['id']} val bpb {best['metrics']['val_bpb']:.4f}" if best else "none"))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def run_phase1(sweep: Sweep, menu: Menu, strategy: str, count: int | None, seed: int, eta: int,
               vocab: int) -> None:
    plan = sweep.plan
    candidates = initial_candidates(menu, strategy, count, seed)
    valid = []
    for candidate in candidates:
        reason = rejection_reason(candidate, menu, plan.base_settings, plan.steps, plan.val_tokens, vocab)
        if reason is None:
            valid.append(candidate)
        else:
            sweep.record({"event": "rejected", "phase": 1, "id": candidate.id, "knobs": candidate.knobs,
                          "reason": reason})
    sweep.say(f"{len(candidates)} candidates ({strategy}), {len(valid)} valid")
    if strategy != "halving":
        sweep.run_tasks([sweep.task(c, plan.steps) for c in order_by_shape(valid, plan.base_settings)])
        return
    budgets = halving_budgets(len(valid), plan.steps, eta)
    sweep.say(f"successive halving, eta {eta}: rungs of {', '.join(map(str, budgets))} steps")
    pool = order_by_shape(valid, plan.base_settings)
    for rung, steps in enumerate(budgets):
        sweep.run_tasks([sweep.task(c, steps, {"rung": rung}) for c in pool])
        if rung == len(budgets) - 1:
            break
        results = sweep.results(steps)
        scores = [(c.id, _score(results.get(c.id))) for c in pool]
        keep = set(survivors(scores, eta))
        pool = [c for c in pool if c.id in keep]
        sweep.say(f"rung {rung} ({steps} steps): {len(pool)} of {len(scores)} go on")


def _score(event: dict[str, Any] | None) -> float | None:
    if event is None or event.get("event") != "evaluated" or event["metrics"].get("diverged"):
        return None
    return event["metrics"].get("val_bpb")


def phase1_ranking(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Phase-1 candidates by (largest budget reached, then val bpb); each id once, diverged ones left out."""
    latest: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "evaluated" and e.get("phase", 1) == 1:
            if e["id"] not in latest or e["steps"] > latest[e["id"]]["steps"]:
                latest[e["id"]] = e
    ok = [e for e in latest.values() if _score(e) is not None]
    return sorted(ok, key=lambda e: (-e["steps"], e["metrics"]["val_bpb"]))


def run_phase2(sweep: Sweep, finalists: Sequence[dict[str, Any]]) -> None:
    tasks = []
    for rank, event in enumerate(finalists, 1):
        extra = {"phase1_rank": rank, "phase1_steps": event["steps"], "phase1_val_bpb": event["metrics"]["val_bpb"]}
        tasks.append(sweep.task(Candidate(event["knobs"]), sweep.plan.steps, extra))
    sweep.run_tasks(tasks)

