"""Which site this machine is, without importing torch: SLURM markers first, then the GPUs nvidia-smi lists.

`detect_site` takes its probes as arguments so tests can describe any machine; the defaults look at the
real one. It always returns the reason it chose, and the launcher prints it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from launch import slurm_env
from nanochat.configargs import UsageError

DEFAULT_SLURM_SITE = "a100-slurm"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_gb: float


GpuProbe = Callable[[], list[GpuInfo]]


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader` ("NVIDIA H100, 81559 MiB").

    Memory is reported in GiB, the unit GPU names use (an A100 40GB lists 40960 MiB = 40 GiB).
    """
    gpus = []
    for line in text.splitlines():
        if "," not in line:
            continue
        name, memory = (part.strip() for part in line.rsplit(",", 1))
        amount = memory.split()[0] if memory else ""
        try:
            memory_gb = float(amount) / 1024 if "MiB" in memory else float(amount)
        except ValueError:  # unified-memory GPUs such as GB10 report "[N/A]"
            memory_gb = 0.0
        gpus.append(GpuInfo(name=name, memory_gb=round(memory_gb, 1)))
    return gpus


def probe_gpus() -> list[GpuInfo]:
    """The GPUs nvidia-smi reports; [] when it is absent or fails (a machine without CUDA)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


def detect_site(available: Sequence[str], environ: Mapping[str, str] | None = None,
                which: Callable[[str], str | None] = shutil.which,
                probe: GpuProbe = probe_gpus, preferred: str = "") -> tuple[str, str]:
    """(site, reason). `preferred` is NANOCHAT_SITE from .env.local; the environment variable wins over it."""
    environ = os.environ if environ is None else environ
    named = environ.get("NANOCHAT_SITE") or preferred
    if slurm_env.inside_job(environ) or which("sbatch"):
        why = "inside SLURM job" if slurm_env.inside_job(environ) else "sbatch is on PATH"
        if named:
            return named, f"{why}; NANOCHAT_SITE={named}"
        return DEFAULT_SLURM_SITE, f"{why} (set NANOCHAT_SITE to pick another SLURM site)"
    gpus = probe()
    if not gpus:
        return "cpu", "no CUDA GPU found by nvidia-smi"
    names = {gpu.name for gpu in gpus}
    if any("GB10" in name for name in names):
        return "gb10", f"found {gpus[0].name}"
    if any("H100" in name for name in names):
        return "h100x8", f"found {len(gpus)} x {gpus[0].name}"
    if named and named in available:
        return named, f"found {len(gpus)} x {gpus[0].name}; NANOCHAT_SITE={named}"
    raise UsageError(f"no site profile matches GPUs {', '.join(sorted(names))}; pass --site (available: "
                     f"{', '.join(available)}) or add env/<name>.env")
