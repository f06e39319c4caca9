"""A throwaway single-node SLURM cluster for tests: MariaDB, slurmdbd, slurmctld and slurmd from Debian's packages.

`SlurmCluster().start(workdir)` writes slurm.conf, slurmdbd.conf and cgroup.conf into `workdir`, starts the four
daemons in the foreground as child processes (each also writes a pid file there) and returns once `sinfo` shows
the node idle and `sacct` answers. `stop()` cancels the cluster's jobs, ends every process it started by pid
(plus job processes that carry this cluster's SLURM_CONF), and deletes the database files. Nothing is killed by
name, so other clusters or daemons on the machine are left alone. `env()` gives the environment a subprocess
needs to use sbatch/squeue/sacct/scontrol against this cluster. Auth is `auth/none`: no munge key, no munged.

`slurm_cluster` is a session-scoped pytest fixture for tests marked `slurm`: it skips when the Debian packages
are missing or the tests do not run as root (slurmd must switch to the job's user), and fails instead when the
CI environment variable is set, because CI installs them with .ci/install_slurm.sh.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin")
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "squeue", "sacct", "scontrol",
                     "mariadbd", "mariadb-install-db", "mariadb")
NODE_NAME = "testnode"
PARTITION = "debug"
CLUSTER_NAME = "nanotest"
DB_USER = "slurm"
DB_PASSWORD = "slurm-test-only"
LOG_TAIL_LINES = 25


def _program_path() -> str:
    """PATH with the sbin directories that hold the daemons appended (a plain user's PATH often lacks them)."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [d for d in SBIN_DIRS if d not in parts])


def slurm_available() -> bool:
    """True when the Debian SLURM, slurmdbd and MariaDB programs are installed."""
    path = _program_path()
    return all(shutil.which(program, path=path) for program in REQUIRED_PROGRAMS)


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _node_memory_mib() -> int:
    """90% of MemTotal, so slurmd never finds less memory than configured."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 9 // 10 // 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"--- {path.name}: (missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text)


@dataclass
class ClusterPorts:
    """The TCP ports this cluster's daemons listen on (chosen free at start, so clusters can coexist)."""

    mariadb: int
    slurmdbd: int
    slurmctld: int
    slurmd: int


@dataclass
class Daemon:
    """One daemon started by the harness (in the foreground, so `process.pid` is the daemon's own pid)."""

    name: str
    process: subprocess.Popen


class ClusterNotReady(RuntimeError):
    """The cluster did not come up in time; the message carries the daemons' log tails."""


class SlurmCluster:
    """A single-node SLURM cluster with accounting, living entirely under one work directory."""

    def __init__(self, ready_timeout_s: float = 90.0, stop_timeout_s: float = 15.0):
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.partition = PARTITION
        self.node_name = NODE_NAME
        self.cluster_name = CLUSTER_NAME
        self.workdir: Path | None = None
        self.ports: ClusterPorts | None = None
        self.ready_after_s: float | None = None
        self.seconds_to_ready: dict[str, float] = {}
        self._daemons: list[Daemon] = []

    @property
    def slurm_conf(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("SlurmCluster.start(workdir) has not been called")
        return self.workdir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """A full environment for subprocesses: this process's variables minus inherited SLURM job variables,
        plus SLURM_CONF pointing at this cluster and PATH with the sbin directories."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.slurm_conf)
        env["PATH"] = _program_path()
        return env

    def patch_environ(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's environment at the cluster for the test's duration (for in-process clients
        such as submitit, which call sbatch/sacct with os.environ)."""
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("SLURM_CONF", str(self.slurm_conf))
        monkeypatch.setenv("PATH", _program_path())

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, sacct, ...) against this cluster and capture its output."""
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def start(self, workdir: Path) -> SlurmCluster:
        """Write the configs into `workdir`, start the daemons and wait until jobs can run and sacct answers."""
        if self._daemons:
            raise RuntimeError("this SlurmCluster is already running")
        if os.geteuid() != 0:
            raise RuntimeError("slurmd must run as root to start jobs as their user; run the slurm tests as root")
        started = time.monotonic()
        self.workdir = Path(workdir).resolve()
        for sub in ("db", "state", "spool", "log", "run"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.ports = ClusterPorts(*_free_ports(4))
        self._write_configs()
        try:
            self._start_mariadb()
            self._start_daemon("slurmdbd", ["slurmdbd", "-D"], self._sacctmgr_answers)
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i"], self._controller_answers)
            self._start_daemon("slurmd", ["slurmd", "-D", "-N", self.node_name], self._node_idle)
            self._wait("sacct", self._sacct_answers)
        except BaseException:
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Cancel jobs, end the daemons by pid (TERM, then KILL), end stray job processes, delete the database."""
        if self._daemons and any(d.name == "slurmctld" and d.process.poll() is None for d in self._daemons):
            subprocess.run(["scancel", "--partition", self.partition], env=self.env(), capture_output=True,
                           timeout=30)
            self._poll(self._queue_empty, timeout_s=10)
        for daemon in reversed(self._daemons):
            self._end_process(daemon.process)
        self._daemons = []
        if self.workdir is not None:
            self._kill_stray_processes()
            shutil.rmtree(self.workdir / "db", ignore_errors=True)
            shutil.rmtree(self.workdir / "spool", ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """The pid of each running daemon, by name."""
        return {d.name: d.process.pid for d in self._daemons}

    def _write_configs(self) -> None:
        work, ports = self.workdir, self.ports
        user = getpass.getuser()
        hostname = socket.gethostname().split(".")[0]
        (work / "slurm.conf").write_text(f"""\
ClusterName={self.cluster_name}
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ports.slurmctld}
SlurmdPort={ports.slurmd}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={work}/state
SlurmdSpoolDir={work}/spool
SlurmctldPidFile={work}/run/slurmctld.pid
SlurmdPidFile={work}/run/slurmd.pid
SlurmctldLogFile={work}/log/slurmctld.log
SlurmdLogFile={work}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports.slurmdbd}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
MinJobAge=5
KillWait=5
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={self.node_name} NodeAddr=127.0.0.1 NodeHostname={hostname} CPUs={_node_cpus()} RealMemory={_node_memory_mib()} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node_name} Default=YES MaxTime=7-00:00:00 State=UP
""")
        (work / "cgroup.conf").write_text("CgroupAutomount=no\n")
        dbd_conf = work / "slurmdbd.conf"
        dbd_conf.write_text(f"""\
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports.slurmdbd}
SlurmUser={user}
PidFile={work}/run/slurmdbd.pid
LogFile={work}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports.mariadb}
StorageUser={DB_USER}
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)
        (work / "mariadb-init.sql").write_text(
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'127.0.0.1';\n")

    def _mariadb_options(self) -> list[str]:
        return ["--no-defaults", f"--datadir={self.workdir}/db", "--innodb-log-file-size=8M",
                "--innodb-buffer-pool-size=64M"]

    def _start_mariadb(self) -> None:
        work = self.workdir
        user = ["--user=root"] if os.geteuid() == 0 else []
        install = subprocess.run(["mariadb-install-db", *self._mariadb_options(), *user, "--skip-test-db",
                                  "--auth-root-authentication-method=socket"],
                                 env=self.env(), capture_output=True, text=True, timeout=60)
        if install.returncode != 0:
            raise ClusterNotReady(f"mariadb-install-db exited {install.returncode}:\n{install.stderr[-3000:]}")
        command = ["mariadbd", *self._mariadb_options(), *user, f"--port={self.ports.mariadb}",
                   "--bind-address=127.0.0.1", "--skip-name-resolve", f"--socket={work}/run/mariadb.sock",
                   f"--pid-file={work}/run/mariadb.pid", f"--log-error={work}/log/mariadb.log",
                   f"--init-file={work}/mariadb-init.sql", "--skip-log-bin", "--innodb-doublewrite=0",
                   "--innodb-flush-log-at-trx-commit=0"]
        self._launch("mariadb", command)
        self._wait("mariadb", self._mariadb_answers)

    def _start_daemon(self, name: str, command: list[str], ready: Callable[[], bool]) -> None:
        self._launch(name, command)
        self._wait(name, ready)

    def _launch(self, name: str, command: list[str]) -> None:
        console = (self.workdir / "log" / f"{name}.console").open("ab")
        try:
            process = subprocess.Popen(command, env=self.env(), stdin=subprocess.DEVNULL, stdout=console,
                                       stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        finally:
            console.close()
        self._daemons.append(Daemon(name, process))

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        waiting = time.monotonic()
        if self._poll(ready, timeout_s=self.ready_timeout_s, watch_daemons=True):
            self.seconds_to_ready[what] = round(time.monotonic() - waiting, 2)
        else:
            raise ClusterNotReady(f"SLURM test cluster: {what} not ready within {self.ready_timeout_s:.0f} s\n"
                                  + self._log_tails())

    def _poll(self, ready: Callable[[], bool], timeout_s: float, watch_daemons: bool = False) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return True
            if watch_daemons:
                for daemon in self._daemons:
                    code = daemon.process.poll()
                    if code is not None:
                        raise ClusterNotReady(f"SLURM test cluster: {daemon.name} exited with {code}\n"
                                              + self._log_tails())
            time.sleep(0.2)
        return False

    def _log_tails(self) -> str:
        logs = sorted((self.workdir / "log").glob("*"))
        return "\n".join(_tail(path) for path in logs)

    def _succeeds(self, *command: str) -> bool:
        try:
            proc = subprocess.run(list(command), env=self.env(), capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def _mariadb_answers(self) -> bool:
        return self._succeeds("mariadb", "--no-defaults", "--protocol=tcp", "-h", "127.0.0.1",
                              "-P", str(self.ports.mariadb), "-u", DB_USER, f"-p{DB_PASSWORD}", "-e", "SELECT 1")

    def _sacctmgr_answers(self) -> bool:
        return self._succeeds("sacctmgr", "--noheader", "--immediate", "list", "cluster")

    def _controller_answers(self) -> bool:
        proc = self.run("scontrol", "ping", check=False, timeout=10)
        return proc.returncode == 0 and "UP" in proc.stdout

    def _node_idle(self) -> bool:
        proc = self.run("sinfo", "--noheader", "--nodes", self.node_name, "--format=%T", check=False, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _sacct_answers(self) -> bool:
        return self._succeeds("sacct", "--noheader", "--allusers")

    def _queue_empty(self) -> bool:
        proc = self.run("squeue", "--noheader", "--format=%i", check=False, timeout=10)
        return proc.returncode != 0 or not proc.stdout.strip()

    def _end_process(self, process: subprocess.Popen) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self.stop_timeout_s)

    def cluster_processes(self) -> list[int]:
        """Pids of all processes but this one whose environment names this cluster's slurm.conf: the daemons,
        slurmstepd and the jobs' processes (the last two outlive slurmd by design)."""
        needle = f"SLURM_CONF={self.slurm_conf}".encode() + b"\0"
        own = {os.getpid(), os.getppid()}
        found = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit() or int(proc_dir.name) in own:
                continue
            try:
                environ = b"\0" + (proc_dir / "environ").read_bytes() + b"\0"
            except OSError:
                continue
            if b"\0" + needle in environ:
                found.append(int(proc_dir.name))
        return found

    def _kill_stray_processes(self) -> None:
        for pid in self.cluster_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def require_slurm() -> None:
    """Skip the calling test when the cluster cannot run here; fail instead under CI (the CI variable is set),
    where .ci/install_slurm.sh must have installed the packages and the tests must run as root."""
    if not slurm_available():
        reason = "SLURM test cluster: Debian packages missing; run .ci/install_slurm.sh"
    elif os.geteuid() != 0:
        reason = "SLURM test cluster: slurmd must run as root; run the slurm tests as root"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster with sacct, shared by the whole test session."""
    require_slurm()
    cluster = SlurmCluster().start(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
