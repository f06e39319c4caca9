"""Stage command lines: `python -m scripts.<stage> --flags`, wrapped in torchrun (and srun) where needed.

The stage's own flags are identical on every site; only the wrapper changes:
  one process          python -m scripts.X ...
  N GPUs, one node     torchrun --standalone --nproc_per_node N -m scripts.X ...
  SLURM, several nodes torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d
                         --rdzv_endpoint <first host>:29500 --rdzv_id <job> -m scripts.X ...
                       (prefixed by `srun --ntasks-per-node 1` when run from the batch script rather
                        than from a task that SLURM already started once per node)
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launch.config import LaunchConfig
from launch.slurm_env import HostnameExpander, SlurmJob, expand_hostnames
from launch.stages import STAGES_BY_NAME, Stage

RENDEZVOUS_PORT = 29500


@dataclass(frozen=True)
class StageCommand:
    stage: str
    argv: tuple[str, ...]

    def shell(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node job meet; placeholders when shown before the job exists."""

    host: str
    job_id: str
    in_step: bool

    @classmethod
    def from_job(cls, job: SlurmJob, expand: HostnameExpander = expand_hostnames) -> Rendezvous:
        return cls(host=job.first_host(expand), job_id=job.job_id, in_step=job.in_step)


PENDING_RENDEZVOUS = Rendezvous(host="<first host of SLURM_JOB_NODELIST>", job_id="<SLURM_JOB_ID>", in_step=True)


def torchrun_program() -> str:
    """The torchrun next to this interpreter (same environment), else the one on PATH."""
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.exists() else "torchrun"


def stage_flags(stage: Stage, config: LaunchConfig) -> list[str]:
    settings = {**vars(config.run), "device_type": config.site.device_type}
    flags: list[str] = []
    for flag, attr in stage.flags:
        value = settings[attr]
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            flags.extend([flag, f"{value:g}" if isinstance(value, float) else str(value)])
    return flags


def stage_command(name: str, config: LaunchConfig, extra_base_train: Sequence[str] = (),
                  rendezvous: Rendezvous | None = None, num_nodes: int | None = None) -> StageCommand:
    """The command for stage `name`; `rendezvous` and `num_nodes` are needed only for multi-node jobs."""
    stage = STAGES_BY_NAME[name]
    module_args = ["-m", stage.command_module, *stage_flags(stage, config)]
    if name == "base_train":
        module_args.extend(extra_base_train)
    site = config.site
    nodes = num_nodes or site.nodes
    if not stage.distributed or (site.gpus_per_node <= 1 and nodes == 1):
        return StageCommand(name, (sys.executable, *module_args))
    if nodes == 1:
        return StageCommand(name, (torchrun_program(), "--standalone", "--nproc_per_node",
                                   str(site.gpus_per_node), *module_args))
    meet = rendezvous or PENDING_RENDEZVOUS
    argv = [torchrun_program(), "--nnodes", str(nodes), "--nproc_per_node", str(site.processes_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{meet.host}:{RENDEZVOUS_PORT}",
            "--rdzv_id", meet.job_id, *module_args]
    if not meet.in_step:
        argv = ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1", *argv]
    return StageCommand(name, tuple(argv))


def pipeline_commands(stages: Sequence[str], config: LaunchConfig, extra_base_train: Sequence[str] = (),
                      rendezvous: Rendezvous | None = None, num_nodes: int | None = None) -> list[StageCommand]:
    return [stage_command(name, config, extra_base_train, rendezvous, num_nodes) for name in stages]
