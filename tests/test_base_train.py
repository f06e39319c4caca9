"""Base pretraining: exact resume after kills and signals, divergence, and bad flags."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat import checkpoint as ckpt
from nanochat.dataloader import split_shards
from tests.conftest import REPO, run_stage

TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "512", "--eval-every", "5", "--eval-tokens", "512",
        "--sample-every", "-1", "--device-type", "cpu", "--tokenizer-threads", "1"]
STEPS = 12


def _losses(cache: Path, tag: str) -> list:
    directory = cache / "base_checkpoints" / tag
    step = ckpt.latest_complete_step(directory)
    meta = ckpt.read_meta(directory, step)
    assert meta["finished"], f"run {tag} did not finish"
    return meta["loop_state"]["loss_history"], meta["loop_state"]["val_history"]


def _popen(cache: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(directory: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = ckpt.latest_complete_step(directory)
        if step is not None and step >= at_least:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def test_kill_and_resume_is_bit_identical(tiny_cache):
    straight = [*TINY, "--num-iterations", str(STEPS), "--save-every", "1", "--model-tag", "straight"]
    run_stage("base_train", *straight, cache=tiny_cache)
    expected = _losses(tiny_cache, "straight")
    assert len(expected[0]) == STEPS

    rng = random.Random(1234)
    resumed = [*TINY, "--num-iterations", str(STEPS), "--save-every", "1", "--model-tag", "resumed"]
    directory = tiny_cache / "base_checkpoints" / "resumed"
    kills = 0
    for target in (STEPS // 2, STEPS // 2 + 3):
        proc = _popen(tiny_cache, resumed)
        _wait_for_checkpoint(directory, target, proc)
        time.sleep(rng.uniform(0.0, 0.4))  # lands anywhere: mid-step, mid-save, mid-eval
        proc.kill()
        proc.wait()
        kills += 1
        leftovers = [p.name for p in directory.iterdir() if ".tmp" in p.name]
        step = ckpt.latest_complete_step(directory)
        assert step is not None and ckpt.read_meta(directory, step) is not None, leftovers
    run_stage("base_train", *resumed, cache=tiny_cache)
    assert kills == 2
    assert _losses(tiny_cache, "resumed") == expected
    assert not [p for p in directory.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "first-ctrl-c"])
def test_signal_saves_and_exits_75_then_resumes(tiny_cache, signum):
    tag = f"sig-{signum.name}"
    args = [*TINY, "--num-iterations", str(STEPS), "--save-every", "100", "--model-tag", tag]
    run_stage("base_train", *[*args[:-1], f"{tag}-straight"], cache=tiny_cache)
    proc = _popen(tiny_cache, args)
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 000003/"):
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline
    out = proc.stdout.read()
    assert proc.wait() == 75, "".join(lines) + out
    assert f"{signum.name} received" in out
    directory = tiny_cache / "base_checkpoints" / tag
    stopped_at = ckpt.latest_complete_step(directory)
    assert 3 <= stopped_at < STEPS and not ckpt.read_meta(directory, stopped_at)["finished"]
    # the ETA after a resume comes from this run's own steps: a long earlier run must not inflate it
    meta_file = ckpt.meta_path(directory, stopped_at)
    meta = json.loads(meta_file.read_text())
    meta["loop_state"]["training_seconds"] = 1e6
    meta_file.write_text(json.dumps(meta))
    again = run_stage("base_train", *args, cache=tiny_cache)
    assert f"resumed from {directory} at step {stopped_at}" in again.stdout
    etas = [float(line.split("| eta ")[1].split()[0]) for line in again.stdout.splitlines() if "| eta " in line]
    assert etas and max(etas) < 5, again.stdout
    assert _losses(tiny_cache, tag) == _losses(tiny_cache, f"{tag}-straight")
    rerun = run_stage("base_train", *args, cache=tiny_cache)
    assert "nothing to do" in rerun.stdout


def test_force_starts_over_once_and_a_stopped_forced_run_resumes(tiny_cache):
    directory = tiny_cache / "base_checkpoints" / "again"
    run_stage("base_train", *TINY, "--num-iterations", "6", "--save-every", "2", "--model-tag", "again",
              cache=tiny_cache)
    forced = [*TINY, "--num-iterations", str(STEPS), "--save-every", "100", "--model-tag", "again", "--force"]
    proc = _popen(tiny_cache, forced)
    for line in proc.stdout:
        if line.startswith("step 000003/"):
            proc.send_signal(signal.SIGUSR1)
            break
    assert proc.wait(timeout=60) == 75, proc.stdout.read()
    stopped = ckpt.latest_complete_step(directory)
    # the earlier run's checkpoints are gone: they would outrank the new run (the finished step 6 did)
    assert ckpt.complete_steps(directory) == [stopped] and not ckpt.read_meta(directory, stopped)["finished"]
    # the same command again (a requeued job) resumes the forced run instead of starting it over once more
    again = run_stage("base_train", *forced, cache=tiny_cache)
    assert f"resumed from {directory} at step {stopped}" in again.stdout
    assert ckpt.latest_complete_step(directory) == STEPS and ckpt.read_meta(directory, STEPS)["finished"]
    assert "resumed" not in run_stage("base_train", *forced, cache=tiny_cache).stdout  # finished: trains again


def _torchrun_two_workers(module: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", f"scripts.{module}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_two_process_run_resumes_only_with_the_same_number_of_processes(tiny_cache):
    """torchrun with two CPU (gloo) workers: per-rank checkpoints, a one-process resume refused in one line
    without touching them, then the two-process resume finishing the run."""
    args = [*TINY, "--num-iterations", "4", "--save-every", "2", "--model-tag", "two"]
    first = _torchrun_two_workers("base_train", *args, "--no-save-final", cache=tiny_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    directory = tiny_cache / "base_checkpoints" / "two"
    assert ckpt.latest_complete_step(directory) == 2
    meta = ckpt.read_meta(directory, 2)
    assert meta["world_size"] == 2 and not meta["finished"]
    written = sorted(p.name for p in directory.iterdir())

    alone = run_stage("base_train", *args, cache=tiny_cache, check=False)
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode == 2 and len(lines) == 1 and "resume with the same number" in lines[0], alone.stderr
    assert sorted(p.name for p in directory.iterdir()) == written

    again = _torchrun_two_workers("base_train", *args, cache=tiny_cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {directory} at step 2" in again.stdout
    meta = ckpt.read_meta(directory, 4)
    assert meta["finished"] and meta["world_size"] == 2
    assert [step for step, _ in meta["loop_state"]["loss_history"]] == [1, 2, 3, 4]


def test_a_rank_failing_alone_ends_the_job_instead_of_hanging_it(tiny_cache):
    """A validation shard of one row group gives rank 1 of 2 no documents: rank 1 fails with its one-line
    error while rank 0 waits for it in the evaluation's all-reduce. The job must end, non-zero, in seconds
    (a rank leaving on an error must not wait at the teardown barrier for a peer that never gets there)."""
    val = split_shards(tiny_cache / "base_data", "val")[0]
    table = pq.read_table(val)
    pq.write_table(table, val, row_group_size=table.num_rows)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "scripts.base_train", *TINY, "--num-iterations", "4", "--model-tag", "alone"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers and kills them 30 s later
        out, err = proc.communicate(timeout=90)
        raise AssertionError(f"the job hung after rank 1 failed\n{out[-2000:]}\n{err[-3000:]}") from None
    assert proc.returncode != 0
    assert "error: rank 1 of 2 gets no documents" in err, err[-3000:]


def test_report_section_and_learning(tiny_cache):
    run_stage("base_train", *TINY, "--num-iterations", "30", "--model-tag", "learn", cache=tiny_cache)
    report = json.loads((tiny_cache / "report" / "base_train.json").read_text())
    assert report["num_iterations"] == 30 and report["tokens_seen"] == 30 * 512
    first, last = report["val_history"][0], report["val_history"][-1]
    assert last[1] < first[1]
    assert report["final_val_bpb"] == last[1]
    assert report["seconds"] > 0  # report.md's per-stage time and total read "seconds", as for every stage


def test_a_run_that_dies_writing_its_report_writes_it_when_run_again(tiny_cache):
    args = [*TINY, "--num-iterations", "4", "--save-every", "2", "--model-tag", "unreported"]
    section = tiny_cache / "report" / "base_train.json"
    section.mkdir(parents=True)  # the section cannot be written: the stage dies there, as if killed
    assert run_stage("base_train", *args, cache=tiny_cache, check=False).returncode == 1
    section.rmdir()
    again = run_stage("base_train", *args, cache=tiny_cache)
    assert "nothing to do" not in again.stdout  # it used to skip the finished run, and the section never came
    assert json.loads(section.read_text())["num_iterations"] == 4
    directory = tiny_cache / "base_checkpoints" / "unreported"
    assert ckpt.read_meta(directory, 4)["finished"]


def test_divergence_exits_3_and_keeps_last_good_checkpoint(tiny_cache):
    args = [*TINY, "--num-iterations", "40", "--save-every", "1", "--model-tag", "boom",
            "--matrix-lr", "1e20", "--embedding-lr", "1e20", "--unembedding-lr", "1e20", "--scalar-lr", "1e20"]
    proc = run_stage("base_train", *args, cache=tiny_cache, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training diverged" in proc.stdout
    directory = tiny_cache / "base_checkpoints" / "boom"
    step = ckpt.latest_complete_step(directory)
    if step is not None:
        meta = ckpt.read_meta(directory, step)
        assert all(math.isfinite(loss) for _, loss in meta["loop_state"]["loss_history"])


def test_resume_with_other_training_settings_is_refused_in_one_line(tiny_cache):
    args = [*TINY, "--num-iterations", "4", "--save-every", "2", "--no-save-final", "--model-tag", "changed"]
    run_stage("base_train", *args, cache=tiny_cache)
    directory = tiny_cache / "base_checkpoints" / "changed"
    assert ckpt.complete_steps(directory) == [2]
    # a shorter run resumed past its end used to train on forever with a negative learning rate
    for changed, named in ((["--num-iterations", "1"], "--num-iterations 4"),
                           (["--matrix-lr", "0.05"], "--matrix-lr 0.02"),
                           (["--total-batch-size", "1024"], "--total-batch-size 512")):
        proc = run_stage("base_train", *args, *changed, cache=tiny_cache, check=False, timeout=30)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and "--force" in lines[0], proc.stderr
    assert ckpt.complete_steps(directory) == [2]
    # what only changes how the same run is carried out resumes
    proc = run_stage("base_train", *args, "--device-batch-size", "2", "--eval-every", "3", "--save-final",
                     cache=tiny_cache)
    assert f"resumed from {directory} at step 2" in proc.stdout
    assert ckpt.read_meta(directory, 4)["finished"]


def test_resume_over_other_shards_is_refused_in_one_line(tiny_cache):
    args = [*TINY, "--num-iterations", "4", "--save-every", "2", "--no-save-final", "--model-tag", "shards"]
    run_stage("base_train", *args, cache=tiny_cache)
    shards = split_shards(tiny_cache / "base_data", "train")
    (tiny_cache / "base_data" / "shard_09999.parquet").write_bytes(shards[0].read_bytes())  # e.g. a later download
    proc = run_stage("base_train", *args, cache=tiny_cache, check=False, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "different shard list" in lines[0], proc.stderr
    assert "--force" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--depth", "0"], "--depth must be a positive number of layers"),
    (["--device-batch-size", "3", "--total-batch-size", "1000"], "total_batch_size"),
    (["--window-pattern", "SXL"], "--window-pattern must be made of S and L"),
    (["--window-pattern", "SL", "--attention", "cudnn"], "--attention cudnn needs a CUDA GPU"),
    (["--final-lr-frac", "5"], "--final-lr-frac must be in [0, 1]"),
])
def test_bad_flags_exit_2_with_one_line(tiny_cache, args, message):
    proc = run_stage("base_train", *TINY, "--num-iterations", "2", *args, cache=tiny_cache, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_missing_inputs_exit_2_naming_the_fix(tiny_cache):
    import shutil

    shutil.rmtree(tiny_cache / "base_data")
    proc = run_stage("base_train", *TINY, cache=tiny_cache, check=False)
    assert proc.returncode == 2 and "download_data.sh" in proc.stderr, proc.stderr
    (tiny_cache / "tokenizer" / "tokenizer.json").unlink()
    proc = run_stage("base_train", *TINY, cache=tiny_cache, check=False)
    assert proc.returncode == 2 and "python -m scripts.tok_train" in proc.stderr, proc.stderr
    assert not (tiny_cache / "base_checkpoints").exists()
