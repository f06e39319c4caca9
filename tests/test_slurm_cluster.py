"""The SLURM test cluster runs real jobs: sacct accounting, the missing --output directory gotcha,
USR1 traps in the batch shell that requeue the job, and a submitit round trip."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import ClusterNotReady, SlurmCluster, require_slurm

pytestmark = pytest.mark.slurm

REQUEUE_ON_USR1 = """\
#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
    echo "second run finished"
    exit 0
fi
trap 'echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; kill "$sleeper"; exit 0' USR1
touch "$MARKER"
sleep 300 &
sleeper=$!
wait "$sleeper"
echo "no signal arrived"
exit 1
"""


def submit(cluster: SlurmCluster, *args: str) -> str:
    """sbatch with `args`; returns the job id."""
    return cluster.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def accounting(cluster: SlurmCluster, job_id: str) -> tuple[str, str]:
    """(State, ExitCode) of the job's allocation as sacct reports it ('' while sacct has no record yet)."""
    out = cluster.run("sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id,
                      "--format=State,ExitCode").stdout.strip()
    if not out:
        return "", ""
    state, exit_code = out.splitlines()[-1].split("|")
    return state, exit_code


def wait_for_final_state(cluster: SlurmCluster, job_id: str, timeout_s: float) -> tuple[str, str]:
    """Poll sacct until the job is in a final state (requeued runs show as PENDING/REQUEUED meanwhile)."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")
    deadline = time.monotonic() + timeout_s
    state, exit_code = "", ""
    while time.monotonic() < deadline:
        state, exit_code = accounting(cluster, job_id)
        if state.split(" ")[0] in final:
            return state, exit_code
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout_s} s")


def test_batch_job_completes_and_sacct_reports_it(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, f"--output={tmp_path}/%j.out", "--wrap", "echo hello from $SLURM_JOB_ID")

    assert wait_for_final_state(slurm_cluster, job_id, timeout_s=30) == ("COMPLETED", "0:0")
    assert (tmp_path / f"{job_id}.out").read_text().strip() == f"hello from {job_id}"


def test_job_fails_when_output_directory_is_missing(slurm_cluster, tmp_path):
    """Slurm does not create the --output directory: the job fails before the script runs."""
    marker = tmp_path / "script_ran"
    job_id = submit(slurm_cluster, f"--output={tmp_path}/missing/%j.out", "--wrap", f"touch {marker}")

    state, exit_code = wait_for_final_state(slurm_cluster, job_id, timeout_s=30)

    assert state == "FAILED" and exit_code != "0:0"
    assert not marker.exists()
    assert not (tmp_path / "missing").exists()


def test_impossible_request_is_refused_at_submit(slurm_cluster):
    """EnforcePartLimits=ALL: a request no node can satisfy fails in sbatch instead of pending forever."""
    proc = slurm_cluster.run("sbatch", "--cpus-per-task=64", "--wrap", "true", check=False)

    assert proc.returncode != 0
    assert "Batch job submission failed" in proc.stderr


def run_requeue_script(cluster: SlurmCluster, tmp_path: Path, *sbatch_args: str) -> str:
    """Submit REQUEUE_ON_USR1 and wait until its first run has installed the trap; returns the job id."""
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_ON_USR1)
    marker = tmp_path / "trap_installed"
    job_id = submit(cluster, f"--output={tmp_path}/%j.out", "--open-mode=append", "--requeue",
                    f"--export=ALL,MARKER={marker}", *sbatch_args, str(script))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, f"job {job_id} did not start within 30 s"
        time.sleep(0.2)
    return job_id


def assert_requeued_once_and_completed(cluster: SlurmCluster, tmp_path: Path, job_id: str) -> None:
    assert wait_for_final_state(cluster, job_id, timeout_s=90) == ("COMPLETED", "0:0")
    lines = (tmp_path / f"{job_id}.out").read_text().splitlines()
    log = [line for line in lines if not line.startswith("slurmstepd")]
    assert log == ["run restart=0", "got USR1", "run restart=1", "second run finished"]


def test_usr1_to_batch_shell_is_trapped_and_requeues(slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` reaches the batch shell's trap, which requeues the job."""
    job_id = run_requeue_script(slurm_cluster, tmp_path)

    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    assert_requeued_once_and_completed(slurm_cluster, tmp_path, job_id)


@pytest.mark.slow
def test_time_limit_signal_reaches_batch_shell_and_requeues(slurm_cluster, tmp_path):
    """The real path: `--signal=B:USR1@50` with a 1-minute limit fires before the limit (slurmctld checks
    time limits every 30 s, so it lands 10-40 s into the run), the trap requeues, the second run completes."""
    job_id = run_requeue_script(slurm_cluster, tmp_path, "--time=1", "--signal=B:USR1@50")

    assert_requeued_once_and_completed(slurm_cluster, tmp_path, job_id)


def test_submitit_job_result_round_trip(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    slurm_cluster.patch_environ(monkeypatch)

    def job_id_and_square(x: int) -> tuple[str, int]:
        return os.environ["SLURM_JOB_ID"], x * x

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=1, slurm_partition=slurm_cluster.partition)
    job = executor.submit(job_id_and_square, 7)

    assert job.result() == (job.job_id, 49)
    assert wait_for_final_state(slurm_cluster, job.job_id, timeout_s=30) == ("COMPLETED", "0:0")


def test_stop_leaves_no_daemon_running(tmp_path):
    require_slurm()
    cluster = SlurmCluster().start(tmp_path / "cluster")
    pids = cluster.pids()
    job_id = submit(cluster, "--output=/dev/null", "--wrap", "sleep 300")
    deadline = time.monotonic() + 30
    while not set(cluster.cluster_processes()) - set(pids.values()):
        assert time.monotonic() < deadline, f"job {job_id} did not start within 30 s"
        time.sleep(0.2)

    cluster.stop()

    assert set(pids) == {"mariadb", "slurmdbd", "slurmctld", "slurmd"}
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()
    assert cluster.cluster_processes() == []


def test_daemon_that_dies_at_start_raises_with_its_log_and_the_rest_are_stopped(tmp_path, monkeypatch):
    """slurmctld refuses to run on a host that slurm.conf does not name as SlurmctldHost."""
    require_slurm()
    monkeypatch.setattr("tests.slurm_cluster.socket.gethostname", lambda: "not-this-host")
    cluster = SlurmCluster(ready_timeout_s=30)

    try:
        with pytest.raises(ClusterNotReady, match="slurmctld exited") as raised:
            cluster.start(tmp_path / "cluster")
    finally:
        cluster.stop()

    assert "--- slurmctld.log" in str(raised.value)
    assert "This host" in str(raised.value)
    assert cluster.pids() == {}
    assert cluster.cluster_processes() == []
