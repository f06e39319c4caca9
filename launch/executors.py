"""Executors: one interface, `launch(plan) -> exit status`, with a local and a SLURM back end.

Both run the same `PipelineRunner`: one subprocess per stage (its own process group, output streamed to
the terminal and to `logs/<site>/<launch-id>/<stage>.log`), one line per stage start and end in
`launch.log`, stop at the first failing stage and return its status. SIGUSR1/SIGUSR2/SIGTERM are
forwarded to the running stage, which saves a checkpoint and exits 75; the pipeline then exits 75 too.

A training stage ignores USR1/USR2 until its handlers are installed, which may be minutes after it starts.
So before signalling it the launcher writes the signal's name to `<stage>.stop` beside the stage's log,
whose path the stage finds in $NANOCHAT_STOP_FILE (`nanochat.stopping`): a stop requested at any moment
takes effect at the stage's first step boundary. TERM reaches a training stage as USR2, which cannot kill
it before its handlers exist (nor make torchrun shut its workers down).

`SlurmExecutor` submits a `PipelineJob` through submitit. Inside the allocation the job runs the runner;
when SLURM signals the time limit, submitit calls `PipelineJob.checkpoint`, which forwards the signal,
waits for the stage to save and exit, and hands back a fresh job that submitit requeues: finished stages
are no-ops on the rerun and training stages resume from their latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit

from launch.commands import Rendezvous, stage_command
from launch.config import SBATCH_INPUT_KEYS, LaunchConfig
from launch.logs import LaunchLog, launch_dir, new_launch_id
from launch.slurm_env import SlurmJob
from launch.stages import STAGES_BY_NAME
from nanochat.configargs import EXIT_INTERRUPTED, EXIT_RESUMABLE, STOP_FILE_ENV

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
SUBMITIT_SIGNAL = signal.SIGUSR2  # submitit's time-limit signal (NCCL may use USR1)
STATUS_MEANING = {
    0: "done",
    1: "crashed (traceback in its log)",
    2: "refused: usage error or missing input (its last line names the fix)",
    3: "training diverged; the last good checkpoint is kept",
    EXIT_RESUMABLE: "stopped after saving a checkpoint; run the same command again to resume",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C before it could save; run the same command again to go on from "
                      "its last checkpoint",
}
TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: picklable, so the SLURM job receives it as is."""

    config: LaunchConfig
    stages: tuple[str, ...]
    extra_base_train: tuple[str, ...]
    repo_root: Path
    logs_root: Path


def _ignore_user_signals() -> None:
    """In the stage's child before exec: torchrun would die on SIGUSR1/2 (default action); the stage's own
    handlers replace the inherited SIG_IGN, so workers still see the signal."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def torchrun_children_resumable(output_tail: bytes) -> bool:
    """torchrun exits 1 whenever a worker fails; its failure summary lists every worker's `exitcode`."""
    codes = re.findall(rb"exitcode\s*:\s*(-?\d+)", output_tail)
    return bool(codes) and all(int(code) == EXIT_RESUMABLE for code in codes)


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, process group) of every descendant of `root`, from /proc; [] where /proc does not exist."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child[0])
    return found


class StageProcess:
    """One running stage: output copied to the terminal and its log; safe to finish from a signal handler."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, out_fd: int):
        self.out_fd = out_fd
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.tail = b""
        self.status: int | None = None
        self.process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=dict(env), cwd=cwd, start_new_session=True,
                                        preexec_fn=_ignore_user_signals)

    def send(self, signum: int) -> None:
        """Signal the stage's process group and every descendant that left it (torchrun starts each worker
        in a session of its own)."""
        targets = [pid for pid, group in descendants(self.process.pid) if group != self.process.pid]
        for send, target in [(os.killpg, self.process.pid), *((os.kill, pid) for pid in targets)]:
            try:
                send(target, signum)
            except ProcessLookupError:
                pass

    def finish(self) -> int:
        """Copy output until the stage closes it, then its exit status (128+N when killed by signal N)."""
        if self.status is not None:
            return self.status
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            os.write(self.out_fd, chunk)
            os.write(self.log_fd, chunk)
            self.tail = (self.tail + chunk)[-TAIL_BYTES:]
        code = self.process.wait()
        self.status = 128 - code if code < 0 else code
        return self.status

    def close(self) -> None:
        os.close(self.log_fd)
        self.process.stdout.close()


class PipelineRunner:
    """Runs the plan's stages in order in this allocation or on this machine."""

    def __init__(self, plan: LaunchPlan, log: LaunchLog, rendezvous: Rendezvous | None = None,
                 num_nodes: int = 1, node_rank: int = 0, environ: Mapping[str, str] | None = None,
                 out_fd: int = 1):
        self.plan = plan
        self.log = log
        self.rendezvous = rendezvous
        self.num_nodes = num_nodes
        self.node_rank = node_rank
        self.env = {**(os.environ if environ is None else environ), **plan.config.stage_env}
        self.out_fd = out_fd
        self.stop_requested = False
        self.current: StageProcess | None = None
        self._stop_signal: int | None = None
        self._stop_file: Path | None = None
        self._current_name = ""
        self._current_start = 0.0
        self._current_logged = False

    def say(self, text: str) -> None:
        os.write(self.out_fd, f"[launch] {text}\n".encode())

    def run(self) -> int:
        config = self.plan.config
        self.log.event(event="launch_start", site=config.site.name, stages=",".join(self.plan.stages),
                       nodes=self.num_nodes)
        started = time.monotonic()
        status = 0
        for name in self.plan.stages:
            if self.stop_requested:
                status = EXIT_RESUMABLE
                break
            stage_started = time.monotonic()
            status = self._run_stage(name)
            if status == 0:
                self.say(f"stage {name} finished in {time.monotonic() - stage_started:.0f} s")
            if status == 0 and self.stop_requested:
                status = EXIT_RESUMABLE
            if status != 0:
                self.say(f"stage {name} exited {status}: {STATUS_MEANING.get(status, 'failed')}; "
                         f"log: {self.log.stage_log(name, self.node_rank, self.num_nodes)}")
                break
        seconds = time.monotonic() - started
        gpu_hours = seconds / 3600 * config.site.gpus_per_node * self.num_nodes
        cost = {} if config.price_per_gpu_hour is None else {"cost": round(gpu_hours * config.price_per_gpu_hour, 2)}
        self.log.event(event="launch_end", status=status, seconds=seconds, gpu_hours=round(gpu_hours, 3), **cost)
        if status == 0:
            spent = f", {gpu_hours:.2f} GPU-hours" if gpu_hours else ""
            spent += f" (about {cost['cost']:.2f})" if cost and gpu_hours else ""
            self.say(f"all {len(self.plan.stages)} stages finished in {seconds:.0f} s{spent}")
        return status

    def _run_stage(self, name: str) -> int:
        command = stage_command(name, self.plan.config, self.plan.extra_base_train, self.rendezvous,
                                self.num_nodes)
        log_path = self.log.stage_log(name, self.node_rank, self.num_nodes)
        self.say(f"stage {name}: {command.shell()}")
        self.log.event(stage=name, event="start", command=command.shell())
        self._current_name, self._current_start, self._current_logged = name, time.monotonic(), False
        self._stop_file = log_path.with_suffix(".stop")
        self._stop_file.unlink(missing_ok=True)  # left by a launcher that was killed (a requeued job reuses the folder)
        if self.stop_requested:  # a stop that came after `run` checked for one
            self._write_stop_file()
        env = {**self.env, STOP_FILE_ENV: str(self._stop_file)}
        self.current = StageProcess(command.argv, env, self.plan.repo_root, log_path, self.out_fd)
        try:
            return self._finish_current()
        finally:
            self.current.close()
            self.current = None
            self._stop_file.unlink(missing_ok=True)
            self._stop_file = None

    def _finish_current(self) -> int:
        stage = self.current
        status = stage.finish()
        under_torchrun = STAGES_BY_NAME[self._current_name].distributed and "--nproc_per_node" in " ".join(
            stage.process.args)
        if status == 1 and self.stop_requested and under_torchrun and torchrun_children_resumable(stage.tail):
            status = EXIT_RESUMABLE
        if status != 0 and self.stop_requested and not STAGES_BY_NAME[self._current_name].saves_checkpoints:
            status = EXIT_RESUMABLE  # terminated by request_stop
        if not self._current_logged:
            self._current_logged = True
            self.log.event(stage=self._current_name, event="end", status=status,
                           seconds=time.monotonic() - self._current_start)
        return status

    def request_stop(self, signum: int) -> None:
        """Forward a stop signal to the running stage; no further stage starts. A training stage learns of it
        from its stop file too, should it not handle signals yet. A stage with nothing to save is terminated
        instead: it would run on past a time limit and be killed there, never requeued."""
        self.stop_requested = True
        self._stop_signal = signum
        if self._stop_file is not None:
            self._write_stop_file()
        if self.current is None:
            return  # a stage about to start finds the stop file
        if STAGES_BY_NAME[self._current_name].saves_checkpoints:
            forwarded = signal.SIGUSR2 if signum == signal.SIGTERM else signum
            as_name = "" if forwarded == signum else f" as {signal.Signals(forwarded).name}"
            self.say(f"forwarding {signal.Signals(signum).name} to stage {self._current_name}{as_name}")
            self.current.send(forwarded)
        else:
            self.say(f"{signal.Signals(signum).name}: stopping stage {self._current_name}, which has nothing to "
                     "save; it runs again on the rerun")
            self.current.send(signal.SIGTERM)

    def _write_stop_file(self) -> None:
        """Record the stop for the current stage (one write: a reader sees the name or an empty file)."""
        fd = os.open(self._stop_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, signal.Signals(self._stop_signal).name.encode())
        finally:
            os.close(fd)

    def stop_and_wait(self, signum: int) -> int | None:
        """Forward `signum` and wait until the stage has saved and exited (for submitit's checkpoint)."""
        self.request_stop(signum)
        return None if self.current is None else self._finish_current()


class Executor(ABC):
    name: str

    @abstractmethod
    def launch(self, plan: LaunchPlan) -> int:
        """Run or submit the plan; the exit status the launcher returns."""


class LocalExecutor(Executor):
    """Stages as subprocesses of this process (a laptop, a GPU box, or inside a SLURM allocation)."""

    name = "local"

    def __init__(self, environ: Mapping[str, str] | None = None, out_fd: int = 1, handle_signals: bool = True):
        self.environ = os.environ if environ is None else environ
        self.out_fd = out_fd
        self.handle_signals = handle_signals

    def launch(self, plan: LaunchPlan) -> int:
        job = SlurmJob.from_environ(self.environ)
        num_nodes = job.num_nodes if job else 1
        rendezvous = Rendezvous.from_job(job) if job and num_nodes > 1 else None
        directory = launch_dir(plan.logs_root, plan.config.site.name, new_launch_id(job))
        runner = PipelineRunner(plan, LaunchLog(directory), rendezvous, num_nodes, 0, self.environ, self.out_fd)
        runner.say(f"logs: {directory}")
        previous = {}
        if self.handle_signals:
            for signum in (*STOP_SIGNALS, signal.SIGINT):
                previous[signum] = signal.signal(signum, lambda s, _f: runner.request_stop(s))
        try:
            return runner.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class PipelineFailed(RuntimeError):
    """Raised inside the SLURM job so that SLURM and submitit record a failure, never COMPLETED."""


class PipelineJob(submitit.helpers.Checkpointable):
    """The callable submitit runs once per node: the remaining stages, with requeue on the time limit."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.runner: PipelineRunner | None = None

    def __getstate__(self):
        return {"plan": self.plan, "runner": None}

    def __call__(self) -> int:
        job = SlurmJob.from_environ()
        if job is None:
            raise PipelineFailed("PipelineJob runs inside a SLURM job (SLURM_JOB_ID is not set)")
        rendezvous = Rendezvous.from_job(job) if job.num_nodes > 1 else None
        directory = launch_dir(self.plan.logs_root, self.plan.config.site.name, job.job_id)
        self.runner = PipelineRunner(self.plan, LaunchLog(directory, enabled=job.node_rank == 0), rendezvous,
                                     job.num_nodes, job.node_rank)
        if job.node_rank != 0:  # submitit checkpoints on the first task only; other nodes just forward
            signal.signal(SUBMITIT_SIGNAL, lambda s, _f: self.runner.request_stop(s))
        status = self.runner.run()
        if status == 0 or (status == EXIT_RESUMABLE and job.node_rank != 0):
            return status
        raise PipelineFailed(f"stopped with status {status}: {STATUS_MEANING.get(status, 'failed')}")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        if self.runner is not None:
            self.runner.stop_and_wait(SUBMITIT_SIGNAL)
        return submitit.helpers.DelayedSubmission(PipelineJob(self.plan))


def slurm_parameters(config: LaunchConfig, repo_root: Path, job_name: str) -> dict[str, object]:
    """submitit.AutoExecutor parameters from the profile and .env.local (unset values are left to SLURM)."""
    site, slurm = config.site, config.slurm
    mail = {name: value for name, value in (("mail-user", slurm.mail_user), ("mail-type", slurm.mail_type))
            if value}
    params: dict[str, object] = {
        "name": job_name,
        "timeout_min": slurm.timeout_minutes,
        "nodes": site.nodes,
        "tasks_per_node": 1,
        "gpus_per_node": site.gpus_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "stderr_to_stdout": True,
        "slurm_signal_delay_s": slurm.signal_lead_seconds,
        "slurm_setup": [f"cd {shlex.quote(str(repo_root))}",
                        f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    optional = {"slurm_partition": slurm.partition, "slurm_account": slurm.account, "slurm_mem": slurm.mem_per_node}
    params.update({name: value for name, value in optional.items() if value})
    if mail:
        params["slurm_additional_parameters"] = mail
    return params


def sbatch_environment(config: LaunchConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment to run sbatch in. sbatch applies its input variables ($SBATCH_TIMELIMIT, ...) over the
    job script's #SBATCH lines, so each one the launcher manages carries the resolved value (a `--set` beats
    a stale export, as `--print-config` shows), or is left out where the resolved value is unset."""
    env = dict(environ)
    for name in SBATCH_INPUT_KEYS:
        value = config.values[name]
        if value is None or value == "":
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@contextlib.contextmanager
def _process_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run the block with os.environ replaced by `env` (submitit starts sbatch with os.environ)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class SlurmExecutor(Executor):
    """Submits the plan as one SLURM job through submitit; returns at once with the job id printed."""

    name = "slurm"

    def __init__(self, out=sys.stdout):
        self.out = out

    def launch(self, plan: LaunchPlan) -> int:
        site_logs = plan.logs_root / plan.config.site.name
        site_logs.mkdir(parents=True, exist_ok=True)
        executor = submitit.AutoExecutor(folder=site_logs / "%j", cluster="slurm",
                                         slurm_max_num_timeout=plan.config.slurm.max_requeues)
        executor.update_parameters(**slurm_parameters(plan.config, plan.repo_root, f"nanochat-{plan.config.site.name}"))
        with _process_environment(sbatch_environment(plan.config, os.environ)):
            job = executor.submit(PipelineJob(plan))
        folder = site_logs / str(job.job_id)
        print(f"[launch] submitted SLURM job {job.job_id}: stages {','.join(plan.stages)}\n"
              f"[launch] logs: {folder}/ (launch.log, <stage>.log, submitit's {job.job_id}_0_log.out)\n"
              f"[launch] watch: squeue -j {job.job_id}; tail -f {folder}/launch.log", file=self.out)
        return 0
