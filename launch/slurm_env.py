"""The SLURM job this process runs in: the one module that reads SLURM_* variables.

Everything else asks `SlurmJob.from_environ()` (None outside a job) instead of reading the environment,
so tests describe a job with a plain mapping and an injected hostname expander.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

HostnameExpander = Callable[[str], list[str]]


def inside_job(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID"))


def expand_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` of a compressed node list ("gpu[01-03]" -> gpu01, gpu02, gpu03)."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            check=True)
    return result.stdout.split()


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    num_nodes: int
    nodelist: str
    node_rank: int
    in_step: bool  # True inside an srun step (one task per node already), False in the batch script

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SlurmJob | None:
        environ = os.environ if environ is None else environ
        if not inside_job(environ):
            return None
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
        step = environ.get("SLURM_STEP_ID", "")
        return cls(
            job_id=environ["SLURM_JOB_ID"],
            num_nodes=int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1),
            nodelist=nodelist,
            node_rank=int(environ.get("SLURM_NODEID", 0)),
            in_step=step not in ("", "batch", "4294967294"),
        )

    def first_host(self, expand: HostnameExpander = expand_hostnames) -> str:
        """The rendezvous host for multi-node torchrun: the first host of the job's node list."""
        hosts = expand(self.nodelist)
        if not hosts:
            raise RuntimeError(f"SLURM node list {self.nodelist!r} expanded to no hosts")
        return hosts[0]
