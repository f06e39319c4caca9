"""trajectory.jsonl integrity (torn lines, exactly-once records, the sweep lock) and the report's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from launch.sweep.cli import report_main
from launch.sweep.report import device_hours, estimate_cost, ranked_table, write_report
from launch.sweep.trajectory import SweepLock, append_event, check_is_trajectory, read_events, repair
from launch.sweep.worker import loss_spike, stress_flags
from nanochat.configargs import UsageError
from tests.conftest import REPO


def evaluated(cid, bpb, wall=3600.0, tps=1000.0, steps=10, phase=1, diverged=False):
    return {"event": "evaluated", "phase": phase, "id": cid, "knobs": {"depth": len(cid)}, "steps": steps,
            "metrics": {"val_bpb": bpb, "wall_seconds": wall, "devices": 1, "tokens_per_second": tps,
                        "diverged": diverged, "loss_history": [[1, 5.0], [2, 4.0]]}}


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path):
    path = tmp_path / "t.jsonl"
    append_event(path, {"event": "header", "phase": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"event":"evaluated","phase":1,"id":"abc"')  # killed mid-write
    assert [e["event"] for e in read_events(path)] == ["header"]
    assert repair(path) > 0
    append_event(path, evaluated("abc", 1.5))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


@pytest.mark.parametrize("content,is_trajectory", [
    (None, True), (b"", True), (b'{"event":"header","phase":1}\n{"event":"evaluated"}\n', True),
    (b'{"event": "header", "phase": 2}\n', True), (b'{"event":"header","pha', True),
    (b"run,score\nbaseline,1.25", False), (b'{"event":"evaluated","id":"x"}\n', False), (b"notes", False)])
def test_only_a_missing_empty_or_header_first_file_is_taken_as_a_trajectory(tmp_path, content, is_trajectory):
    path = tmp_path / "t.jsonl"
    if content is not None:
        path.write_bytes(content)
    if is_trajectory:
        check_is_trajectory(path)
    else:
        with pytest.raises(UsageError, match="is not a sweep trajectory"):
            check_is_trajectory(path)


def test_a_folder_given_as_the_trajectory_is_a_usage_error(tmp_path):
    for check in (read_events, check_is_trajectory):
        with pytest.raises(UsageError, match=f"{tmp_path} is a folder; name the trajectory file"):
            check(tmp_path)


def test_a_candidate_record_is_written_once(tmp_path):
    path = tmp_path / "t.jsonl"
    assert append_event(path, evaluated("abc", 1.5))
    assert not append_event(path, evaluated("abc", 1.4))
    assert append_event(path, evaluated("abc", 1.2, steps=20))  # another rung is another record
    assert append_event(path, evaluated("abc", 1.1, phase=2))
    assert len(read_events(path)) == 3


def test_a_second_sweep_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    holder = textwrap.dedent(f"""
        import sys, time
        from launch.sweep.trajectory import SweepLock
        with SweepLock(__import__('pathlib').Path({str(path)!r})):
            print('locked', flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match="another sweep"), SweepLock(path):
            pass
    finally:
        proc.kill()
        proc.wait()
    with SweepLock(path):  # free again once the holder is gone
        pass


def test_loss_spike_after_the_first_tenth_of_the_steps():
    steady = [[s, 6.0 - 0.05 * s] for s in range(1, 101)]
    assert loss_spike(steady, 100) is None
    spiked = steady[:50] + [[51, 9.9]] + steady[51:]
    assert "step 51" in loss_spike(spiked, 100)
    early = [[1, 3.0], [2, 7.0]] + steady[2:]
    assert loss_spike(early, 100) is None


def test_phase2_flags_late_divergence_and_regression():
    extra = {"phase1_val_bpb": 2.0, "phase1_steps": 60}
    assert stress_flags({"val_bpb": 1.8}, extra) == []
    assert "worse than phase 1" in stress_flags({"val_bpb": 2.1}, extra)[0]
    assert "late divergence" in stress_flags({"val_bpb": None, "diverged": True, "divergence": "nan"}, extra)[0]
    assert stress_flags({"val_bpb": 2.1}, {}) == []


@pytest.mark.parametrize("argv, message", [
    (["--top", "0"], "--top must be at least 1, got 0"),
    (["--top", "-1"], "--top must be at least 1, got -1"),
    (["--price-per-gpu-hour", "-2"], "--price-per-gpu-hour must be a finite number >= 0, got -2.0"),
    (["--price-per-gpu-hour", "nan"], "--price-per-gpu-hour must be a finite number >= 0, got nan"),
    (["--target-tokens", "inf"], "--target-tokens must be a finite number > 0, got inf"),
    (["--target-tokens", "0"], "--target-tokens must be a finite number > 0, got 0.0"),
])
def test_sweep_report_refuses_bad_numbers_before_writing(tmp_path, capsys, argv, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"event": "header", "phase": 1}) + "\n" + json.dumps(evaluated("a", 1.5)) + "\n")
    assert report_main([str(path), *argv], REPO, environ={}) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_cost_arithmetic_and_ranking(tmp_path):
    events = [{"event": "header", "phase": 1, "site": "cpu", "strategy": "random", "steps": 10},
              evaluated("bb", 2.0, wall=1800), evaluated("a", 1.5, wall=1800, tps=2000.0),
              evaluated("ccc", None, wall=900, diverged=True),
              {"event": "failed", "phase": 1, "id": "dd", "knobs": {}, "steps": 10, "exit_status": 1,
               "wall_seconds": 900, "devices": 1, "log_tail": ["Traceback", "boom"]},
              {"event": "rejected", "phase": 1, "id": "ee", "knobs": {}, "reason": "constraint x"}]
    assert device_hours(events) == pytest.approx(1.5)
    cost = estimate_cost(events, events[2], 2.0, 7.2e6)
    assert cost.sweep_cost == pytest.approx(3.0)
    assert cost.target_device_hours == pytest.approx(1.0)  # 7.2e6 tokens at 2000 tok/s
    assert cost.target_cost == pytest.approx(2.0)
    path = tmp_path / "t.jsonl"
    text, written = write_report(events, path, 2.0, 7.2e6)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [row.split(" | ")[1] for row in rows] == ["a", "bb", "ccc"]
    assert "boom" in text and "constraint x" in text and "3.00" in text
    assert {p.suffix for p in written} == {".md", ".png"} and all(p.stat().st_size > 0 for p in written)
    assert "| 1 | a |" in ranked_table([events[2]])


def test_a_failure_superseded_by_a_retry_is_not_reported_as_failed(tmp_path):
    failure = {"event": "failed", "phase": 1, "id": "dd", "knobs": {}, "steps": 10, "exit_status": 1,
               "wall_seconds": 900, "devices": 1, "log_tail": ["Traceback", "boom"], "attempt": 1}
    events = [{"event": "header", "phase": 1, "site": "cpu", "strategy": "random", "steps": 10}, failure,
              {**evaluated("dd", 1.5, wall=900), "attempt": 2}]
    path = tmp_path / "t.jsonl"
    for event in events:
        assert append_event(path, event)
    assert not append_event(path, failure)
    assert append_event(path, {**failure, "attempt": 2})
    text, _ = write_report(events, path, 2.0, None)
    assert "boom" not in text and "0 failed" in text and "| 1 | dd |" in text
    assert device_hours(events) == pytest.approx(0.5)
