"""The recipe lab for real on the tiny demo cache: a sweep SIGKILLed halfway and resumed records every
candidate exactly once; phase 2 reruns the finalists; the report ranks them. The 20-candidate version is slow."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.sweep import campaign
from launch.sweep.candidates import Candidate
from launch.sweep.executors import SweepExecutor
from launch.sweep.trajectory import append_event, read_events
from tests.conftest import REPO

TINY_MENU = """\
[fixed]
head_dim = 16
total_batch_size = 512
compile = false
precision = "fp32"
tokenizer_threads = 1

[knobs]
depth = [1, 2]
aspect_ratio = [16, 32]
max_seq_len = [64, 128]
device_batch_size = [4, 8]
matrix_lr = {{ min = 0.005, max = 0.05, log = true }}
{extra}
[constraints]
head_fits = "head_dim <= depth * aspect_ratio"
batch_divides = "total_batch_size % (device_batch_size * max_seq_len) == 0"
"""


def sweep_command(cache: Path, menu: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "launch", "sweep", "--site", "cpu", "--set", f"NANOCHAT_BASE_DIR={cache}",
            "--set", "OMP_NUM_THREADS=1", "--menu", str(menu), "--out", str(out), *args]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def records(out: Path, phase: int = 1) -> list[dict]:
    return [e for e in read_events(out) if e.get("event") in ("evaluated", "rejected", "failed")
            and e.get("phase") == phase]


def kill_after(command: list[str], out: Path, runs: int, timeout: float) -> None:
    """Start the sweep, SIGKILL it once `runs` candidates were evaluated, then tear its last line as a
    writer killed mid-write would."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while sum(e["event"] == "evaluated" for e in records(out)) < runs:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(out, "ab") as fh:
        fh.write(b'{"event":"evaluated","phase":1,"id":"torn')


def check_killed_and_resumed(cache: Path, tmp_path: Path, candidates: int, steps: int, kill_at: int) -> Path:
    menu, out = tmp_path / "menu.toml", tmp_path / "trajectory.jsonl"
    menu.write_text(TINY_MENU.format(extra=""))
    command = sweep_command(cache, menu, out, "--candidates", str(candidates), "--steps", str(steps),
                            "--val-tokens", "512")
    kill_after(command, out, kill_at, timeout=300)
    assert len(records(out)) < candidates
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cut a torn last line" in resumed.stderr
    assert out.read_bytes().endswith(b"\n")
    lines = out.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines)
    ids = Counter(e["id"] for e in records(out))
    assert len(ids) == candidates and set(ids.values()) == {1}
    assert [e["event"] for e in read_events(out)].count("finished") == 1
    evaluated = [e for e in records(out) if e["event"] == "evaluated"]
    assert evaluated and all(e["metrics"]["val_bpb"] > 0 and e["metrics"]["tokens_per_second"] > 0
                             and e["metrics"]["peak_memory_mb"] > 0 for e in evaluated)
    rejected = [e for e in records(out) if e["event"] == "rejected"]
    assert all("constraint" in e["reason"] for e in rejected)
    return out


def test_killed_sweep_resumes_then_finalists_and_report(tiny_cache, tmp_path):
    out = check_killed_and_resumed(tiny_cache, tmp_path, candidates=5, steps=3, kill_at=2)

    again = run(sweep_command(tiny_cache, tmp_path / "menu.toml", out, "--candidates", "5", "--steps", "3",
                              "--val-tokens", "512"))
    assert again.returncode == 0 and "running 0" in again.stderr
    changed = run(sweep_command(tiny_cache, tmp_path / "menu.toml", out, "--candidates", "5", "--steps", "4"))
    assert changed.returncode == 2 and "different" in changed.stderr

    phase2 = run([sys.executable, "-m", "launch", "sweep", "--finalists", "2", "--steps", "6", "--from", str(out)])
    assert phase2.returncode == 0, phase2.stderr[-3000:]
    finalists = [e for e in records(out, phase=2)]
    assert len(finalists) == 2 and all(e["steps"] == 6 and "phase1_val_bpb" in e for e in finalists)

    report = run([sys.executable, "-m", "launch", "sweep-report", str(out), "--price-per-gpu-hour", "3",
                  "--target-tokens", "1e6"])
    assert report.returncode == 0, report.stderr
    assert "## Phase 2: 2 finalists" in report.stdout and "target run of 1,000,000 tokens" in report.stdout
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0


def test_bad_menu_and_missing_corpus_refuse_before_running(tiny_cache, tmp_path):
    menu = tmp_path / "menu.toml"
    menu.write_text(TINY_MENU.format(extra='n_kv_head_ratio = [1, 2]\n'))
    proc = run(sweep_command(tiny_cache, menu, tmp_path / "t.jsonl"))
    assert proc.returncode == 2 and "n-kv-head-ratio" in proc.stderr
    menu.write_text(TINY_MENU.format(extra="").replace('"head_dim <= depth * aspect_ratio"', '"len(depth) > 0"'))
    proc = run(sweep_command(tiny_cache, menu, tmp_path / "t.jsonl"))
    assert proc.returncode == 2 and "Call is not allowed" in proc.stderr
    proc = run(sweep_command(tmp_path / "empty", menu, tmp_path / "t.jsonl"))
    assert proc.returncode == 2 and "--stages demo_data,tok_train" in proc.stderr
    assert not (tmp_path / "t.jsonl").exists()


def test_a_bad_eta_is_refused_before_the_trajectory_is_written(tiny_cache, tmp_path):
    menu, out = tmp_path / "menu.toml", tmp_path / "t.jsonl"
    menu.write_text(TINY_MENU.format(extra=""))
    args = ("--strategy", "halving", "--candidates", "4", "--steps", "4", "--val-tokens", "512")
    proc = run(sweep_command(tiny_cache, menu, out, *args, "--eta", "1"))
    assert proc.returncode == 2 and "--eta must be at least 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_another_file_as_out_or_as_the_report_target_is_left_untouched(tiny_cache, tmp_path):
    """--out naming someone's file (its last line unterminated, which a trajectory repair would cut) is refused,
    and so is a report that would be written over its own trajectory."""
    menu, out = tmp_path / "menu.toml", tmp_path / "results.csv"
    menu.write_text(TINY_MENU.format(extra=""))
    out.write_bytes(b"run,score\nbaseline,1.25")
    proc = run(sweep_command(tiny_cache, menu, out, "--steps", "2", "--val-tokens", "512"))
    assert proc.returncode == 2 and "is not a sweep trajectory" in proc.stderr, proc.stderr
    assert out.read_bytes() == b"run,score\nbaseline,1.25"
    assert not Path(f"{out}.lock").exists()
    proc = run(sweep_command(tiny_cache, menu, tmp_path, "--steps", "2", "--val-tokens", "512"))
    assert proc.returncode == 2 and "is a folder" in proc.stderr and not Path(f"{tmp_path}.lock").exists()
    named_md = tmp_path / "sweep.md"
    named_md.write_text('{"event":"header","phase":1}\n')
    proc = run([sys.executable, "-m", "launch", "sweep-report", str(named_md)])
    assert proc.returncode == 2 and "name the trajectory *.jsonl" in proc.stderr
    assert named_md.read_text() == '{"event":"header","phase":1}\n'


def test_sigterm_during_a_candidates_final_evaluation_stops_the_sweep(tiny_cache, tmp_path):
    """The trainer only looks for a stop at step boundaries; one that arrives while the last evaluation runs
    must still stop the sweep after that candidate is recorded, instead of being lost."""
    menu, out = tmp_path / "menu.toml", tmp_path / "t.jsonl"
    menu.write_text(TINY_MENU.format(extra="").replace("depth = [1, 2]", "depth = [1]")
                    .replace("aspect_ratio = [16, 32]", "aspect_ratio = [16]").replace("[64, 128]", "[128]")
                    .replace("[4, 8]", "[4]"))
    command = sweep_command(tiny_cache, menu, out, "--candidates", "2", "--steps", "3", "--val-tokens", "100000")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any("step 000003/000003" in log.read_text() for log in tiny_cache.glob("sweeps/*/*/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline, "the first candidate never reached its end"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert "SIGTERM" in stderr and "rerun" in stderr
    assert [e["event"] for e in records(out)] == ["evaluated"]
    assert "finished" not in [e["event"] for e in read_events(out)]
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len({e["id"] for e in records(out)}) == len(records(out)) == 2


class RecordsOnlyTheFirst(SweepExecutor):
    """An array whose other tasks died (time limit, node failure, scancel) before recording anything."""

    def run(self, tasks, on_event):
        event = {"event": "evaluated", **tasks[0].base_event(), "metrics": {"val_bpb": 3.0, "wall_seconds": 1.0}}
        append_event(tasks[0].trajectory, event)
        on_event(event)


def test_runs_that_end_without_a_record_leave_the_sweep_unfinished(tmp_path):
    out = tmp_path / "t.jsonl"
    config = SimpleNamespace(site=SimpleNamespace(cache_dir=tmp_path / "cache"), stage_env={})
    plan = campaign.SweepPlan(1, config, out, tmp_path / "sweeps", 3, 512, {}, {"event": "header", "phase": 1})
    sweep = campaign.Sweep(plan, RecordsOnlyTheFirst(), out=io.StringIO())
    sweep.open()
    with pytest.raises(campaign.RunsMissing, match="2 of 3 runs ended without a record"):
        sweep.run_tasks([sweep.task(Candidate({"matrix_lr": lr}), 3) for lr in (0.01, 0.02, 0.03)])


@pytest.mark.slow
def test_twenty_candidate_sweep_killed_halfway_and_resumed(tiny_cache, tmp_path):
    check_killed_and_resumed(tiny_cache, tmp_path, candidates=20, steps=15, kill_at=8)


class FailsFirstAttempts(SweepExecutor):
    """Candidate runs that fail (a node's out-of-memory, a crash) until attempt `succeeds_at`."""

    def __init__(self, succeeds_at: int):
        self.succeeds_at = succeeds_at
        self.seen: list[tuple[str, int]] = []

    def run(self, tasks, on_event):
        for task in tasks:
            self.seen.append((task.candidate_id, task.attempt))
            if task.attempt >= self.succeeds_at:
                event = {"event": "evaluated", **task.base_event(), "metrics": {"val_bpb": 2.5, "wall_seconds": 1.0}}
            else:
                event = {"event": "failed", **task.base_event(), "exit_status": 1, "wall_seconds": 1.0,
                         "log_tail": ["CUDA out of memory"]}
            append_event(task.trajectory, event)
            on_event(event)


def test_failed_runs_are_skipped_on_resume_unless_retried(tmp_path):
    out = tmp_path / "t.jsonl"
    config = SimpleNamespace(site=SimpleNamespace(cache_dir=tmp_path / "cache"), stage_env={})
    plan = campaign.SweepPlan(1, config, out, tmp_path / "sweeps", 3, 512, {}, {"event": "header", "phase": 1})

    def sweep_with(executor, retry_failed):
        sweep = campaign.Sweep(plan, executor, out=io.StringIO(), retry_failed=retry_failed)
        sweep.open()
        sweep.run_tasks([sweep.task(Candidate({"matrix_lr": 0.01}), 3)])
        sweep.finish(campaign.now())
        return sweep

    executor = FailsFirstAttempts(succeeds_at=3)
    sweep_with(executor, retry_failed=False)
    sweep_with(executor, retry_failed=False)
    assert [attempt for _, attempt in executor.seen] == [1]
    sweep_with(executor, retry_failed=True)
    sweep = sweep_with(executor, retry_failed=True)
    assert [attempt for _, attempt in executor.seen] == [1, 2, 3]
    assert [e["attempt"] for e in records(out)] == [1, 2, 3]
    assert [e["event"] for e in records(out)] == ["failed", "failed", "evaluated"]
    summaries = [e["summary"] for e in read_events(out) if e["event"] == "finished"]
    assert [(s["evaluated"], s["failed"]) for s in summaries] == [(0, 1), (0, 1), (1, 0)]
    assert summaries[-1]["device_seconds"] == 3.0
    assert sweep.results(3)[executor.seen[0][0]]["event"] == "evaluated"
    sweep_with(executor, retry_failed=True)
    assert len(executor.seen) == 3 and len(summaries) == 3
