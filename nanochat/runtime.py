"""The one explicit set-up call a stage makes: device, distributed process group, seeds, matmul precision.

Nothing here runs at import time. torchrun's RANK / LOCAL_RANK / WORLD_SIZE are read when `setup_runtime`
is called; SLURM variables are never read here (the launcher turns them into torchrun's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.configargs import UsageError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    autocast_dtype: torch.dtype | None

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed-precision context for forward passes (a no-op when the run is in float32)."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device_type(requested: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit request that cannot be met is a ValueError."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda was requested but no CUDA device is visible; use --device-type cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device-type mps was requested but MPS is not available; use --device-type cpu")
    if requested not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device type {requested!r}; use auto, cuda, mps or cpu")
    return requested


TORCHRUN_FIX = "torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; unset them to run as one process"


def torchrun_ranks(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables (one process when unset); garbage is a
    UsageError naming the variable."""
    numbers = {}
    for name, default, least in (("RANK", "0", 0), ("LOCAL_RANK", "0", 0), ("WORLD_SIZE", "1", 1)):
        text = environ.get(name, default)
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise UsageError(f"{name}={text!r} is not a whole number >= {least}: {TORCHRUN_FIX}")
        numbers[name] = value
    if numbers["RANK"] >= numbers["WORLD_SIZE"]:
        raise UsageError(f"RANK={numbers['RANK']} is not below WORLD_SIZE={numbers['WORLD_SIZE']}: {TORCHRUN_FIX}")
    return numbers["RANK"], numbers["LOCAL_RANK"], numbers["WORLD_SIZE"]


HIGH_PRIORITY_ENV = "TORCH_NCCL_HIGH_PRIORITY"


def process_group_options(backend: str, environ: Mapping[str, str]) -> dict:
    """Extra `init_process_group` arguments: NCCL gets high-priority CUDA streams.

    Gradient reductions then start as soon as their inputs are ready instead of queueing behind compute
    kernels (four H200s at depth 20: the optimizer phase 21.8 -> 17.9 ms, docs/benchmarks.md). Where the
    user set TORCH_NCCL_HIGH_PRIORITY (0 or 1), torch's own reading of it decides and no option is passed.
    """
    if backend != "nccl" or HIGH_PRIORITY_ENV in environ:
        return {}
    return {"pg_options": dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)}


def setup_runtime(device_type: str = "auto", seed: int = 42, precision: str = "auto") -> Runtime:
    """Pick the device, join the process group started by torchrun (if any), seed and set matmul precision.

    precision: 'auto' (bf16 autocast on CUDA, float32 elsewhere), 'bf16' or 'fp32'.
    """
    dtype = resolve_device_type(device_type)
    rank, local_rank, world_size = torchrun_ranks(os.environ)
    if dtype == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(dtype)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dtype == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if dtype == "cuda" else None,
                                **process_group_options(backend, os.environ))
    torch.manual_seed(seed)
    if dtype == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    if precision == "auto":
        autocast_dtype = torch.bfloat16 if dtype == "cuda" else None
    elif precision == "bf16":
        autocast_dtype = torch.bfloat16
    elif precision == "fp32":
        autocast_dtype = None
    else:
        raise ValueError(f"unknown precision {precision!r} for the runtime; use auto, bf16 or fp32")
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   autocast_dtype=autocast_dtype)


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group; stages call this from a `finally`.

    After a normal end, once every rank got here (a rank that tears down while rank 0 still writes its report
    aborts the job). While an exception is on its way out, at once: the other ranks may be waiting for this
    one in a collective and never reach the barrier, and waiting there would hang the whole job instead of
    letting this rank exit, so that torchrun ends the job."""
    if runtime.distributed and dist.is_initialized():
        if sys.exc_info()[1] is None:
            dist.barrier()
        dist.destroy_process_group()


def print0(runtime: Runtime, *args, **kwargs) -> None:
    """Print from rank 0 only, flushed, so `tail -f` on a log shows lines as they happen."""
    if runtime.is_master:
        print(*args, **kwargs, flush=True)


def launched_as_rank0() -> bool:
    """Whether this process is rank 0 by torchrun's RANK (or was not started by torchrun); usable before
    `setup_runtime` and inside signal handlers."""
    return os.environ.get("RANK", "0") == "0"


def print0_before_setup(*args, **kwargs) -> None:
    """`print0` for a stage that ends before `setup_runtime`, so the line appears once under torchrun too."""
    if launched_as_rank0():
        print(*args, **kwargs, flush=True)


def warn0(runtime: Runtime, message: str) -> None:
    """A loud warning for fallbacks that change behaviour (kernel, precision, MFU peak)."""
    if runtime.is_master:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
