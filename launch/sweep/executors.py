"""Where candidates run: back to back in this process, or as a SLURM job array through submitit.

Both take a list of `CandidateTask`s and return when every one is recorded in the trajectory (or, for the
array, has ended). The workstation executor keeps one process for the whole sweep so torch.compile's
graphs and kernels are reused between same-shape candidates (the sweep orders them by shape); when the
shape changes it resets dynamo, so a long sweep never reaches dynamo's recompile limit and silently falls
back to eager. The SLURM executor submits one array task per candidate (`--max-parallel` at a time), each
running one GPU (or the site's cores on a CPU cluster) and appending its own line under the file lock.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import submitit
from tqdm import tqdm

from launch.config import LaunchConfig
from launch.executors import slurm_parameters
from launch.sweep.candidates import shape_key
from launch.sweep.trajectory import append_event
from launch.sweep.worker import CandidateTask, StoppedBySignal, run_and_record, run_candidate
from nanochat.stopping import StopRequest

EventCallback = Callable[[dict], None]


class SweepExecutor(ABC):
    @abstractmethod
    def run(self, tasks: Sequence[CandidateTask], on_event: EventCallback) -> None:
        """Run the tasks; every outcome ends up in the trajectory file."""


class WorkstationExecutor(SweepExecutor):
    """Candidates one after another in this process, on its one device."""

    def run(self, tasks: Sequence[CandidateTask], on_event: EventCallback) -> None:
        previous_shape = None
        stop = StopRequest().install()  # each trainer passes its signals on to it
        for task in tqdm(tasks, desc="candidates", unit="run", disable=not sys.stderr.isatty()):
            if stop.requested:
                raise StoppedBySignal(f"{stop.signal_name} received: stopped before candidate {task.candidate_id}; "
                                      "rerun the same command to resume")
            shape = shape_key(task.settings)
            if previous_shape is not None and shape != previous_shape:
                import torch._dynamo

                torch._dynamo.reset()
            previous_shape = shape
            event = run_candidate(task)
            if append_event(task.trajectory, event):
                on_event(event)


class SlurmArrayExecutor(SweepExecutor):
    """One SLURM array task per candidate; waits for the array and reports what the tasks recorded."""

    def __init__(self, config: LaunchConfig, repo_root: Path, logs_root: Path, max_parallel: int,
                 poll_seconds: float = 5.0):
        self.config = config
        self.repo_root = repo_root
        self.logs_root = logs_root
        self.max_parallel = max_parallel
        self.poll_seconds = poll_seconds

    def parameters(self) -> dict[str, object]:
        """The site's submitit parameters for one single-device task (an array task runs one candidate)."""
        site, slurm = self.config.site, self.config.slurm
        params = slurm_parameters(self.config, self.repo_root, f"sweep-{site.name}")
        gpus = min(site.gpus_per_node, 1)
        params.update(nodes=1, gpus_per_node=gpus, slurm_array_parallelism=self.max_parallel,
                      cpus_per_task=max(1, slurm.cpus_per_task // max(site.gpus_per_node, 1)))
        return params

    def run(self, tasks: Sequence[CandidateTask], on_event: EventCallback) -> None:
        if not tasks:
            return
        folder = self.logs_root / self.config.site.name / "sweep" / "%j"
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**self.parameters())
        jobs = executor.map_array(run_and_record, list(tasks))
        print(f"[sweep] submitted SLURM array {jobs[0].job_id.split('_')[0]}: {len(jobs)} candidates, at most "
              f"{self.max_parallel} at a time; logs under {folder.parent}", file=sys.stderr)
        pending = dict(enumerate(jobs))
        while pending:
            for index, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[index]
                try:
                    on_event(job.result())
                except Exception as exc:  # the task died before recording (time limit, node failure)
                    print(f"[sweep] array task {job.job_id} ({tasks[index].candidate_id}) ended without a "
                          f"result: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}; it runs "
                          "again when the sweep is resumed", file=sys.stderr)
            if pending:
                time.sleep(self.poll_seconds)
