"""The recipe lab's SLURM executor on the real test cluster: one array task per candidate, at most
--max-parallel at a time, each appending its own line to the shared trajectory under the file lock."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from launch.sweep.trajectory import read_events
from tests.test_slurm_pipeline import launch, make_checkout
from tests.test_sweep_run import TINY_MENU

pytestmark = pytest.mark.slurm


def test_sweep_runs_as_a_job_array_and_each_task_records_its_candidate(slurm_cluster, tiny_cache, tmp_path):
    checkout, cache = make_checkout(tmp_path)
    assert cache == tiny_cache
    menu, out = tmp_path / "menu.toml", tmp_path / "trajectory.jsonl"
    menu.write_text(TINY_MENU.format(extra=""))
    proc = launch(checkout, slurm_cluster, "sweep", "--site", "cpu-slurm", "--menu", str(menu), "--out", str(out),
                  "--candidates", "4", "--steps", "3", "--val-tokens", "512", "--max-parallel", "2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "submitted SLURM array" in proc.stderr
    array_id = proc.stderr.split("submitted SLURM array ")[1].split(":")[0]
    records = [e for e in read_events(out) if e.get("event") in ("evaluated", "rejected", "failed")]
    assert set(Counter(e["id"] for e in records).values()) == {1} and len(records) == 4
    evaluated = [e for e in records if e["event"] == "evaluated"]
    assert evaluated and all(e["metrics"]["val_bpb"] > 0 for e in evaluated)
    assert all(state == "COMPLETED" for state in final_states(slurm_cluster, array_id, len(evaluated))), \
        final_states(slurm_cluster, array_id, len(evaluated))


def test_an_array_task_cancelled_before_recording_leaves_the_sweep_to_resume(slurm_cluster, tiny_cache, tmp_path):
    checkout, _ = make_checkout(tmp_path)
    menu, out = tmp_path / "menu.toml", tmp_path / "trajectory.jsonl"
    menu.write_text(TINY_MENU.format(extra="").replace("depth = [1, 2]", "depth = [1]")
                    .replace("aspect_ratio = [16, 32]", "aspect_ratio = [16]").replace("[64, 128]", "[128]")
                    .replace("[4, 8]", "[4]"))
    args = ("sweep", "--site", "cpu-slurm", "--menu", str(menu), "--out", str(out), "--candidates", "2",
            "--steps", "1000", "--val-tokens", "512", "--max-parallel", "1")
    env = {**slurm_cluster.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("NANOCHAT_BASE_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=checkout, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        running = slurm_cluster.run("squeue", "--noheader", "--states=RUNNING", "--format=%i").stdout.split()
        if running:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "no array task started"
        time.sleep(0.5)
    slurm_cluster.run("scancel", running[0])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-4000:]
    assert "ended without a record" in stderr
    assert "finished" not in [e.get("event") for e in read_events(out)]


def final_states(cluster, array_id: str, tasks: int, timeout_s: float = 60.0) -> list[str]:
    """The array tasks' accounting states once none is still running. A task's result file is written
    before its process exits, so the sweep can return while SLURM still books the last task as RUNNING
    or COMPLETING."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = cluster.run("sacct", "-j", array_id, "--noheader", "--allocations", "--parsable2",
                            "--format=JobID,State").stdout.split()
        states = [line.split("|")[1] for line in lines]
        settled = len(states) == tasks and not set(states) & {"PENDING", "RUNNING", "COMPLETING"}
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(1.0)
