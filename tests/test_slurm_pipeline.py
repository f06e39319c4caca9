"""The project on a real SLURM cluster: `sbatch slurm/speedrun.slurm`, `python -m launch` through submitit,
a job that hits its time limit and resumes at the same step, and preflight refusing before submitting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import checkpoint as ckpt
from tests.conftest import REPO
from tests.test_slurm_cluster import submit, wait_for_final_state

pytestmark = pytest.mark.slurm

TINY_SITE = """\
NANOCHAT_SITE=cpu-slurm
NANOCHAT_BASE_DIR={cache}
DEPTH=2
ASPECT_RATIO=32
HEAD_DIM=16
MAX_SEQ_LEN=64
DEVICE_BATCH_SIZE=4
TOTAL_BATCH_SIZE=256
VOCAB_SIZE=512
DEMO_MEGABYTES=0.3
BASE_ITERATIONS={base_iterations}
MID_ITERATIONS=4
SFT_ITERATIONS=4
EVAL_EVERY=50
EVAL_TOKENS=512
SAVE_EVERY=50
EVAL_MAX_PER_TASK=4
EVAL_SPLIT_TOKENS=512
FINETUNE_EVAL_EVERY=4
CHAT_MAX_NEW_TOKENS=8
CPUS_PER_TASK=2
SBATCH_TIMELIMIT={time_limit}
SIGNAL_LEAD_SECONDS={signal_lead}
"""


def make_checkout(tmp_path: Path, **site) -> tuple[Path, Path]:
    """A user's checkout (the repository's files) with a .env.local that shrinks the cpu-slurm site."""
    checkout, cache = tmp_path / "checkout", tmp_path / "cache"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    (checkout / "logs").mkdir(exist_ok=True)
    values = {"base_iterations": 20, "time_limit": "00:20:00", "signal_lead": 60, **site}
    (checkout / ".env.local").write_text(TINY_SITE.format(cache=cache, **values))
    return checkout, cache


def launch(checkout: Path, cluster, *args: str, timeout: float = 120,
           exported: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**cluster.env(), "PYTHONUNBUFFERED": "1", **(exported or {})}
    env.pop("NANOCHAT_BASE_DIR", None)
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_id_from(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("[launch] submitted SLURM job "):
            return line.split()[4].rstrip(":")
    raise AssertionError(f"no job id in launcher output:\n{output}")


def test_speedrun_script_runs_demo_pipeline_to_report(slurm_cluster, tmp_path):
    checkout, cache = make_checkout(tmp_path)
    job = submit(slurm_cluster, "--chdir", str(checkout), "--gpus-per-node=0", "--cpus-per-task=2",
                 "--time=20", str(checkout / "slurm" / "speedrun.slurm"))
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=600)
    out = (checkout / "logs" / f"nanochat-speedrun-{job}.out").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    assert "[launch] site cpu-slurm" in out
    report = (cache / "report" / "report.md").read_text()
    assert "| Metric |" in report and (cache / "report" / "train_loss.png").is_file()
    launch_logs = list((checkout / "logs" / "cpu-slurm").glob("*/launch.log"))
    assert len(launch_logs) == 1
    ends = [line for line in launch_logs[0].read_text().splitlines() if "event=end" in line]
    assert len(ends) == 9 and all("status=0" in line for line in ends), ends


def test_speedrun_script_takes_any_env_local_the_launcher_takes(slurm_cluster, tmp_path):
    """A dotenv value with a space is fine for the launcher; a shell sourcing the file ran `project` instead."""
    checkout, cache = make_checkout(tmp_path)
    with open(checkout / ".env.local", "a") as local:
        local.write("WANDB_PROJECT=my project\n")
    job = submit(slurm_cluster, "--chdir", str(checkout), "--gpus-per-node=0", "--cpus-per-task=2",
                 "--time=5", str(checkout / "slurm" / "speedrun.slurm"), "--stages", "demo_data")
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=120)
    out = (checkout / "logs" / f"nanochat-speedrun-{job}.out").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-3000:]
    assert "[launch] site cpu-slurm" in out and (cache / "DEMO").exists()


def test_speedrun_script_stops_requeueing_after_max_requeues(slurm_cluster, tmp_path):
    """A stage that saves and exits 75 requeues the job only MAX_REQUEUES times, as the submitit path does."""
    checkout, cache = make_checkout(tmp_path, base_iterations=100_000)
    with open(checkout / ".env.local", "a") as local:
        local.write("MAX_REQUEUES=0\n")
    job = submit(slurm_cluster, "--chdir", str(checkout), "--gpus-per-node=0", "--cpus-per-task=2", "--time=1",
                 "--signal=B:USR1@30", str(checkout / "slurm" / "speedrun.slurm"),
                 "--stages", "demo_data,tok_train,base_train")
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=300)
    out = (checkout / "logs" / f"nanochat-speedrun-{job}.out").read_text()
    assert (state, exit_code) == ("FAILED", "75:0"), out[-3000:]
    assert "not requeueing" in out and "(MAX_REQUEUES=0)" in out and "restart 1" not in out
    assert ckpt.latest_complete_step(cache / "base_checkpoints" / "d2") is not None


def test_failed_stage_fails_the_job(slurm_cluster, tmp_path):
    checkout, cache = make_checkout(tmp_path)
    job = submit(slurm_cluster, "--chdir", str(checkout), "--gpus-per-node=0", "--cpus-per-task=2",
                 "--time=20", str(checkout / "slurm" / "speedrun.slurm"),
                 "--stages", "demo_data,tok_train,base_train,report", "--", "--window-pattern", "X")
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=300)
    out = (checkout / "logs" / f"nanochat-speedrun-{job}.out").read_text()
    assert state == "FAILED" and exit_code == "2:0", out[-3000:]
    assert "--window-pattern must be made of S and L" in out and "launcher exited 2" in out
    launch_log = next((checkout / "logs" / "cpu-slurm").glob("*/launch.log")).read_text()
    assert "stage=tok_train event=end status=0" in launch_log
    assert "stage=base_train event=end status=2" in launch_log and "stage=report" not in launch_log


def test_launch_submits_through_submitit_and_completes(slurm_cluster, tmp_path):
    """Also: a `--set` time limit reaches the job although the shell still exports an older $SBATCH_TIMELIMIT
    (sbatch applies its input variables over the script's #SBATCH lines)."""
    checkout, cache = make_checkout(tmp_path)
    proc = launch(checkout, slurm_cluster, "--stages", "demo_data,tok_train,tok_eval",
                  "--set", "SBATCH_TIMELIMIT=00:17:00", exported={"SBATCH_TIMELIMIT": "00:03:00"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=300)
    limit = slurm_cluster.run("sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job,
                              "--format=Timelimit").stdout.strip().splitlines()
    assert limit == ["00:17:00"]
    launch_log = (checkout / "logs" / "cpu-slurm" / job / "launch.log").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), launch_log
    assert "stage=tok_eval event=end status=0" in launch_log
    assert (cache / "tokenizer" / "tokenizer.json").is_file()


def test_preflight_refusal_submits_nothing(slurm_cluster, tmp_path):
    checkout, _ = make_checkout(tmp_path)
    before = slurm_cluster.run("sacct", "--noheader", "--allocations", "--parsable2", "--format=JobID").stdout
    proc = launch(checkout, slurm_cluster, "--stages", "base_train")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fix: python -m launch --site cpu-slurm --stages tok_train" in proc.stderr
    after = slurm_cluster.run("sacct", "--noheader", "--allocations", "--parsable2", "--format=JobID").stdout
    assert before == after


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_matches_uninterrupted_loss(slurm_cluster, tmp_path):
    checkout, cache = make_checkout(tmp_path, base_iterations=1500, time_limit="00:01:00", signal_lead=30)
    proc = launch(checkout, slurm_cluster, "--stages", "demo_data,tok_train,base_train")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    state, exit_code = wait_for_final_state(slurm_cluster, job, timeout_s=900)
    job_logs = checkout / "logs" / "cpu-slurm" / job
    launch_log = (job_logs / "launch.log").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), launch_log
    base_ends = [line for line in launch_log.splitlines() if "stage=base_train event=end" in line]
    assert any("status=75" in line for line in base_ends), launch_log
    assert base_ends[-1].split("status=")[1].startswith("0"), launch_log

    dry = launch(checkout, slurm_cluster, "--stages", "base_train", "--executor", "local", "--dry-run")
    command = next(line.strip() for line in dry.stdout.splitlines() if "-m scripts.base_train" in line)
    argv = command.split()[1:]
    argv[argv.index("--model-tag") + 1] = "uninterrupted"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cache), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, *argv], cwd=checkout, env=env, check=True, capture_output=True, timeout=900)

    def final(tag: str) -> dict:
        directory = cache / "base_checkpoints" / tag
        return ckpt.read_meta(directory, ckpt.latest_complete_step(directory))

    requeued, straight = final("d2"), final("uninterrupted")
    assert requeued["finished"] and requeued["step"] == 1500
    assert requeued["loop_state"]["loss_history"][-1] == straight["loop_state"]["loss_history"][-1]
    assert json.dumps(requeued["loop_state"]["val_history"]) == json.dumps(straight["loop_state"]["val_history"])
