"""LocalExecutor with fake stages (tiny scripts in a temporary repo), SLURM parameters and multi-node commands."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from launch.commands import Rendezvous, stage_command
from launch.config import resolve_config
from launch.executors import (
    LaunchPlan,
    LocalExecutor,
    PipelineJob,
    descendants,
    sbatch_environment,
    slurm_parameters,
    torchrun_children_resumable,
)
from launch.slurm_env import SlurmJob
from nanochat import checkpoint as ckpt
from tests.test_base_train import TINY

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d stage=(\w+) event=end status=(\d+) seconds=\d+\.\d$")


def fake_repo(root: Path, stages: dict[str, str]) -> Path:
    """A repo with the real site files and `scripts/<stage>.py` bodies standing in for the stages."""
    shutil.copytree(REPO / "env", root / "env")
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    for name, body in stages.items():
        (root / "scripts" / f"{name}.py").write_text(textwrap.dedent(body))
    return root


def plan_for(root: Path, stages: tuple[str, ...], cache: Path) -> LaunchPlan:
    config = resolve_config("cpu", root, {"NANOCHAT_BASE_DIR": str(cache)}, {"HOME": str(cache)}, list,
                            cpu_count=lambda: 2)
    return LaunchPlan(config, stages, (), root, root / "logs")


def run_local(plan: LaunchPlan, tmp_path: Path) -> tuple[int, str]:
    out = tmp_path / "terminal.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        status = LocalExecutor(environ={"PATH": os.environ["PATH"]}, out_fd=fd).launch(plan)
    finally:
        os.close(fd)
    return status, out.read_text()


def test_runs_stages_in_order_with_logs(tmp_path):
    echo_env = "import os, sys; print('tok_eval sees', os.environ['NANOCHAT_BASE_DIR'], sys.argv[1:])"
    root = fake_repo(tmp_path / "repo", {"tok_eval": echo_env, "report": "print('report done')"})
    status, terminal = run_local(plan_for(root, ("tok_eval", "report"), tmp_path / "cache"), tmp_path)
    assert status == 0
    (folder,) = (root / "logs" / "cpu").iterdir()
    assert f"tok_eval sees {tmp_path / 'cache'} []" in (folder / "tok_eval.log").read_text()
    assert "report done" in (folder / "report.log").read_text()
    assert "tok_eval sees" in terminal and "all 2 stages finished" in terminal
    assert re.search(r"\[launch\] stage tok_eval finished in \d+ s\n", terminal)
    assert terminal.index("stage tok_eval finished") < terminal.index("stage report:")
    ends = [LINE.match(line) for line in (folder / "launch.log").read_text().splitlines() if "event=end" in line]
    assert [(m.group(1), m.group(2)) for m in ends] == [("tok_eval", "0"), ("report", "0")]


def test_stops_at_first_failure_with_its_status(tmp_path):
    root = fake_repo(tmp_path / "repo", {
        "tok_eval": "import sys; print('diverged'); sys.exit(3)",
        "report": "open('ran', 'w').write('report must not run')",
    })
    status, terminal = run_local(plan_for(root, ("tok_eval", "report"), tmp_path / "cache"), tmp_path)
    assert status == 3
    assert not (root / "ran").exists()
    (folder,) = (root / "logs" / "cpu").iterdir()
    log = (folder / "launch.log").read_text()
    assert "stage=tok_eval event=end status=3" in log and "stage=report" not in log
    assert "event=launch_end status=3" in log
    assert "training diverged" in terminal and "all 2 stages finished" not in terminal
    assert "stage tok_eval finished" not in terminal


STOPPABLE = """
import os, signal, sys, time
def stop(signum, frame):
    os.write(1, f'saved checkpoint on {signal.Signals(signum).name}\\n'.encode())  # one write: workers share the pipe
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
print('ready', flush=True)
time.sleep(60)
sys.exit(0)
"""
DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from launch.config import resolve_config
from launch.executors import LaunchPlan, LocalExecutor
root = Path({root!r})
config = resolve_config("cpu", root, {{"NANOCHAT_BASE_DIR": {cache!r}}}, {{"HOME": {cache!r}}}, list)
sys.exit(LocalExecutor().launch(LaunchPlan(config, ({first!r}, "report"), (), root, root / "logs")))
"""


def test_forwards_sigusr1_and_exits_75(tmp_path):
    root = fake_repo(tmp_path / "repo", {"base_train": STOPPABLE, "report": "open('ran', 'w').write('no')"})
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), root=str(root), cache=str(tmp_path / "cache"),
                                    first="base_train"))
    launcher = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    stage_log = None
    while time.monotonic() < deadline:
        logs = list((root / "logs" / "cpu").glob("*/base_train.log")) if (root / "logs").exists() else []
        if logs and "ready" in logs[0].read_text():
            stage_log = logs[0]
            break
        time.sleep(0.1)
    assert stage_log is not None, "fake stage never started"
    launcher.send_signal(signal.SIGUSR1)
    output = launcher.communicate(timeout=30)[0].decode()
    assert launcher.returncode == 75, output
    assert "saved checkpoint on SIGUSR1" in stage_log.read_text()
    assert not (root / "ran").exists()
    log = (stage_log.parent / "launch.log").read_text()
    assert "stage=base_train event=end status=75" in log and "event=launch_end status=75" in log


EVALUATING = """
import time
print('ready', flush=True)
time.sleep(60)  # an evaluation: no handlers, so the stop signals it inherits as ignored stay ignored
"""


def test_a_stage_with_nothing_to_save_is_stopped_at_once_and_exits_75(tmp_path):
    root = fake_repo(tmp_path / "repo", {"tok_eval": EVALUATING, "report": "open('ran', 'w').write('no')"})
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), root=str(root), cache=str(tmp_path / "cache"), first="tok_eval"))
    launcher = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not list(root.glob("logs/cpu/*/tok_eval.log")) or "ready" not in next(
            root.glob("logs/cpu/*/tok_eval.log")).read_text():
        assert time.monotonic() < deadline, "fake stage never started"
        time.sleep(0.1)
    started = time.monotonic()
    launcher.send_signal(signal.SIGUSR1)
    # it used to run on to its end: under SLURM, past the time limit, killed there and never requeued
    output = launcher.communicate(timeout=30)[0].decode()
    assert launcher.returncode == 75 and time.monotonic() - started < 20, output
    assert "runs again on the rerun" in output and not (root / "ran").exists()


TRAINING_DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from launch.config import resolve_config
from launch.executors import LaunchPlan, LocalExecutor
config = resolve_config("cpu", Path({repo!r}), {{"NANOCHAT_BASE_DIR": {cache!r}}}, {{"HOME": {cache!r}}}, list)
plan = LaunchPlan(config, ("base_train",), {extra!r}, Path({repo!r}), Path({logs!r}))
sys.exit(LocalExecutor().launch(plan))
"""


def _stage_started(launcher: subprocess.Popen) -> bool:
    """The launcher has started the stage's process, which is still importing torch for a second or more."""
    return bool(descendants(launcher.pid))


def _stage_announced(launcher: subprocess.Popen) -> bool:
    """The launcher has printed the stage's command line and is about to start it."""
    return True


@pytest.mark.parametrize(("signum", "when"), [(signal.SIGUSR1, _stage_started), (signal.SIGTERM, _stage_started),
                                              (signal.SIGUSR1, _stage_announced)],
                         ids=["SIGUSR1-stage-importing", "SIGTERM-stage-importing", "SIGUSR1-stage-not-yet-started"])
def test_a_stop_while_the_training_stage_starts_up_saves_at_its_first_boundary_and_resumes(tiny_cache, tmp_path,
                                                                                          signum, when):
    """The stage ignores USR1/2 (and would die of TERM) until its StopRequest is installed, after its imports,
    data checks and model build; a stop that comes before then must still stop it at its first boundary."""
    extra = (*TINY, "--num-iterations", "4", "--save-every", "100", "--model-tag", "startup")
    driver = tmp_path / "driver.py"
    driver.write_text(TRAINING_DRIVER.format(repo=str(REPO), cache=str(tiny_cache), extra=extra,
                                             logs=str(tmp_path / "logs")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    for line in launcher.stdout:
        if line.startswith("[launch] stage base_train:"):
            break
    deadline = time.monotonic() + 10
    while not when(launcher):
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.01)
    launcher.send_signal(signum)
    output = launcher.communicate(timeout=180)[0]
    assert launcher.returncode == 75, output
    directory = tiny_cache / "base_checkpoints" / "startup"
    assert ckpt.complete_steps(directory) == [0] and not ckpt.read_meta(directory, 0)["finished"], output
    assert not list((tmp_path / "logs").rglob("*.stop"))
    rerun = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=env, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {directory} at step 0" in rerun.stdout
    assert ckpt.read_meta(directory, 4)["finished"]


@pytest.mark.slow
def test_a_stop_while_torchrun_workers_start_up_stops_every_rank_at_the_same_boundary(tiny_cache, tmp_path):
    """Real torchrun, two CPU workers of the real base_train: both find the stop file when they install their
    handlers, and the vote (read one boundary late) stops both at boundary 1."""
    from launch.executors import PipelineRunner
    from launch.logs import LaunchLog

    config = resolve_config("h100x8", REPO, {"NANOCHAT_BASE_DIR": str(tiny_cache), "GPUS_PER_NODE": "2"},
                            {"HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}, list)
    extra = (*TINY, "--num-iterations", "4", "--save-every", "100", "--model-tag", "startup", "--no-compile",
             "--precision", "fp32")
    runner = PipelineRunner(LaunchPlan(config, ("base_train",), extra, REPO, tmp_path / "logs"),
                            LaunchLog(tmp_path / "logs"), out_fd=os.open(tmp_path / "terminal.txt",
                                                                          os.O_WRONLY | os.O_CREAT))

    def stop_when_workers_exist():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(descendants(os.getpid())) < 3:  # torchrun and two workers
            time.sleep(0.01)
        runner.request_stop(signal.SIGUSR1)

    threading.Thread(target=stop_when_workers_exist, daemon=True).start()
    try:
        assert runner.run() == 75, (tmp_path / "logs" / "base_train.log").read_text()
    finally:
        os.close(runner.out_fd)
    directory = tiny_cache / "base_checkpoints" / "startup"
    assert ckpt.complete_steps(directory) == [1], (tmp_path / "logs" / "base_train.log").read_text()


def test_torchrun_failure_summary_maps_to_75():
    summary = b"""Failures:\n[1]:\n  exitcode  : 75 (pid: 12)\nRoot Cause:\n[0]:\n  exitcode  : 75 (pid: 11)\n"""
    assert torchrun_children_resumable(summary)
    assert not torchrun_children_resumable(summary.replace(b"75 (pid: 12)", b"1 (pid: 12)"))
    assert not torchrun_children_resumable(b"Traceback ...")


@pytest.fixture
def slurm_config(tmp_path):
    shutil.copytree(REPO / "env", tmp_path / "env")
    (tmp_path / ".env.local").write_text("SBATCH_ACCOUNT=physics\nSBATCH_PARTITION=a100\n"
                                         "SBATCH_MAIL_USER=ada@example.edu\nSBATCH_MAIL_TYPE=END,FAIL\n")
    return resolve_config("a100-slurm", tmp_path, {"NODES": "2"}, {"HOME": "/h", "USER": "ada"}, list)


def test_slurm_parameters_from_profile_and_env_local(slurm_config, tmp_path):
    params = slurm_parameters(slurm_config, tmp_path, "nanochat-a100-slurm")
    assert params["slurm_partition"] == "a100" and params["slurm_account"] == "physics"
    assert params["slurm_additional_parameters"] == {"mail-user": "ada@example.edu", "mail-type": "END,FAIL"}
    assert (params["timeout_min"], params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (720, 2, 8, 1)
    assert params["slurm_signal_delay_s"] == 300
    assert params["cpus_per_task"] == 64 and params["slurm_mem"] == "0"


def test_sbatch_runs_with_the_resolved_values_of_its_input_variables(tmp_path):
    """A `--set` beats a stale exported $SBATCH_TIMELIMIT for sbatch too; other variables pass through."""
    shutil.copytree(REPO / "env", tmp_path / "env")
    environ = {"HOME": "/h", "USER": "ada", "SBATCH_TIMELIMIT": "00:30:00", "SBATCH_QOS": "short", "PATH": "/bin"}
    config = resolve_config("a100-slurm", tmp_path, {"SBATCH_TIMELIMIT": "06:00:00", "SBATCH_ACCOUNT": ""},
                            environ, list)
    env = sbatch_environment(config, {**environ, "SBATCH_ACCOUNT": "stale"})
    assert env["SBATCH_TIMELIMIT"] == "06:00:00" and env["SBATCH_QOS"] == "short" and env["PATH"] == "/bin"
    assert "SBATCH_ACCOUNT" not in env and "SBATCH_PARTITION" not in env


def test_multinode_torchrun_from_fake_nodelist(slurm_config):
    environ = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
               "SLURM_NODEID": "0", "SLURM_STEP_ID": "0"}
    job = SlurmJob.from_environ(environ)
    seen = []

    def expand(nodelist: str) -> list[str]:
        seen.append(nodelist)
        return ["gpu07", "gpu08"]

    command = stage_command("base_train", slurm_config, (), Rendezvous.from_job(job, expand), job.num_nodes)
    assert seen == ["gpu[07-08]"]
    assert command.argv[1:13] == ("--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                                  "--rdzv_endpoint", "gpu07:29500", "--rdzv_id", "4242", "-m", "scripts.base_train")
    batch_job = SlurmJob.from_environ({**environ, "SLURM_STEP_ID": "batch"})
    wrapped = stage_command("base_train", slurm_config, (), Rendezvous.from_job(batch_job, expand), 2)
    assert wrapped.argv[:5] == ("srun", "--nodes", "2", "--ntasks-per-node", "1")
    assert stage_command("report", slurm_config, (), None, 2).argv[1:] == ("-m", "scripts.report")


def test_pipeline_job_checkpoint_resubmits_itself(slurm_config, tmp_path):
    job = PipelineJob(LaunchPlan(slurm_config, ("base_train",), (), tmp_path, tmp_path / "logs"))
    delayed = job.checkpoint()
    assert isinstance(delayed.function, PipelineJob) and delayed.function is not job
    assert delayed.function.plan == job.plan and delayed.function.runner is None
    assert pickle.loads(pickle.dumps(delayed.function)).plan == job.plan


@pytest.mark.slow
def test_torchrun_stage_stop_maps_to_75(tmp_path):
    """Real torchrun, two CPU workers: USR1 reaches the workers (own sessions), torchrun's exit 1 becomes 75."""
    from launch.executors import PipelineRunner
    from launch.logs import LaunchLog

    root = fake_repo(tmp_path / "repo", {"base_train": STOPPABLE})
    config = resolve_config("h100x8", root, {"NANOCHAT_BASE_DIR": str(tmp_path / "c"), "GPUS_PER_NODE": "2"},
                            {"HOME": str(tmp_path)}, list)
    plan = LaunchPlan(config, ("base_train",), (), root, root / "logs")
    log = LaunchLog(tmp_path / "logs")
    out_fd = os.open(tmp_path / "terminal.txt", os.O_WRONLY | os.O_CREAT)
    runner = PipelineRunner(plan, log, out_fd=out_fd)

    def stop_when_ready():
        stage_log = tmp_path / "logs" / "base_train.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stage_log.exists() and stage_log.read_text().count("ready") >= 2:
                runner.request_stop(signal.SIGUSR1)
                return
            time.sleep(0.2)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    try:
        assert runner.run() == 75
    finally:
        os.close(out_fd)
    assert (tmp_path / "logs" / "base_train.log").read_text().count("saved checkpoint on SIGUSR1") == 2
