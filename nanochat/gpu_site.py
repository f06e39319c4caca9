"""Site fixes for particular GPUs, applied by one explicit call: `apply_site_fixes(device_props)`.

Decisions (each applied fix prints one loud line on stderr, and is returned):
- CUDA allocator: `PYTORCH_ALLOC_CONF=expandable_segments:True` (fewer fragmentation OOMs, and needed on
  GB10's unified memory), unless the user set PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF. The allocator
  reads it when it first allocates, so call this before the first CUDA tensor is made (reading the device
  properties is fine: it allocates nothing); if CUDA is already initialised it is also applied at run
  time through torch's allocator-settings call, which affects new memory segments only.
- sm_12x (GB10 is sm_121a): Triton's bundled ptxas may not know the architecture ("Value 'sm_121a' is not
  defined for option 'gpu-name'"); when TRITON_PTXAS_PATH is unset, point it at a system ptxas from CUDA
  12.9 or later (the first that knows sm_121), looked for in /usr/local/cuda/bin and on PATH.
- GB10 (48 SMs): inductor's `is_big_gpu` refuses max-autotune GEMM templates below 68 SMs; on GB10 it is
  patched to say yes. Nothing is patched on any other GPU.

The MFU peaks for GB10 (62 TFLOP/s bf16, 500 TFLOP/s NVFP4 dense) live in `nanochat.hardware`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

EXPANDABLE_SEGMENTS = "expandable_segments:True"
PTXAS_CANDIDATES = ("/usr/local/cuda/bin/ptxas",)
# CUDA 12.9 is the first toolkit whose ptxas accepts sm_121 / sm_121a.
PTXAS_MIN_VERSION_FOR_SM12X = (12, 9)
# torch._inductor.utils.is_big_gpu's threshold (multiprocessor count) for max-autotune GEMMs.
INDUCTOR_BIG_GPU_SMS = 68


@dataclass(frozen=True)
class DeviceProps:
    """The fields of `torch.cuda.get_device_properties()` the decisions read."""

    name: str
    major: int
    minor: int
    multi_processor_count: int

    @classmethod
    def of(cls, props) -> DeviceProps:
        return cls(props.name, props.major, props.minor, props.multi_processor_count)


@dataclass(frozen=True)
class SiteFix:
    name: str
    detail: str

    def notice(self) -> str:
        return f"SITE FIX [{self.name}]: {self.detail}"


def is_gb10(props: DeviceProps) -> bool:
    return "GB10" in props.name.upper() or (props.major, props.minor) == (12, 1)


def ptxas_version(path: str) -> tuple[int, int] | None:
    """The CUDA release of a ptxas binary (`ptxas --version` says '... release 13.0, V13.0.88'), or None."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_system_ptxas(exists: Callable[[str], bool], which: Callable[[str], str | None],
                      version_of: Callable[[str], tuple[int, int] | None]) -> str | None:
    """The first system ptxas (fixed locations, then PATH) new enough for sm_12x, or None."""
    candidates = [*PTXAS_CANDIDATES, which("ptxas")]
    for path in candidates:
        if not path or not exists(path):
            continue
        version = version_of(path)
        if version is not None and version >= PTXAS_MIN_VERSION_FOR_SM12X:
            return path
    return None


def _patch_is_big_gpu() -> None:
    import torch._inductor.utils as inductor_utils

    inductor_utils.is_big_gpu = lambda index_or_device=0: True


def _apply_allocator_settings_now() -> None:
    import torch

    if torch.cuda.is_initialized():
        set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
        if set_settings is None:
            set_settings = torch.cuda.memory._set_allocator_settings
        set_settings(EXPANDABLE_SEGMENTS)


def apply_site_fixes(device_props, environ: MutableMapping[str, str] | None = None,
                     exists: Callable[[str], bool] = os.path.exists,
                     which: Callable[[str], str | None] = shutil.which,
                     version_of: Callable[[str], tuple[int, int] | None] = ptxas_version,
                     patch_is_big_gpu: Callable[[], None] = _patch_is_big_gpu,
                     apply_allocator_now: Callable[[], None] = _apply_allocator_settings_now,
                     notify: Callable[[str], None] | None = None) -> list[SiteFix]:
    """Decide and apply the fixes for this GPU (see the module docstring); returns what was applied.

    `device_props`: `torch.cuda.get_device_properties(i)` or a `DeviceProps`. The keyword arguments exist
    so the decisions can be tested with a fake environment, filesystem and patch functions.
    """
    props = device_props if isinstance(device_props, DeviceProps) else DeviceProps.of(device_props)
    environ = os.environ if environ is None else environ
    notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
    fixes: list[SiteFix] = []

    if "PYTORCH_ALLOC_CONF" not in environ and "PYTORCH_CUDA_ALLOC_CONF" not in environ:
        environ["PYTORCH_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
        apply_allocator_now()
        fixes.append(SiteFix("allocator", f"PYTORCH_ALLOC_CONF={EXPANDABLE_SEGMENTS} (was unset)"))

    if props.major == 12 and "TRITON_PTXAS_PATH" not in environ:
        arch = f"sm_{props.major}{props.minor}a"
        ptxas = find_system_ptxas(exists, which, version_of)
        if ptxas is not None:
            environ["TRITON_PTXAS_PATH"] = ptxas
            fixes.append(SiteFix("ptxas", f"TRITON_PTXAS_PATH={ptxas}: Triton's bundled ptxas may not know {arch}"))
        else:
            fixes.append(SiteFix("ptxas-missing", f"no system ptxas from CUDA 12.9+ found for {arch}; Triton "
                                                  "kernels may fail to build (install CUDA 13+ or set "
                                                  "TRITON_PTXAS_PATH)"))

    if is_gb10(props) and props.multi_processor_count < INDUCTOR_BIG_GPU_SMS:
        patch_is_big_gpu()
        fixes.append(SiteFix("is_big_gpu", f"{props.name} has {props.multi_processor_count} SMs (< "
                                           f"{INDUCTOR_BIG_GPU_SMS}): inductor's is_big_gpu patched to allow "
                                           "max-autotune GEMMs"))
    for fix in fixes:
        notify(fix.notice())
    return fixes
