"""Datasheet peak FLOP/s per accelerator and precision, for model-FLOPs utilisation (MFU).

Dense (no sparsity) tensor-core peaks. The table is matched against the device name reported by the
driver; an unknown accelerator yields None, and the caller says so loudly instead of guessing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from nanochat.configargs import UsageError

# (substring of the device name, peak bf16 FLOP/s, peak fp8 FLOP/s or None), most specific first.
_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    ("GB200", 2.5e15, 5.0e15),
    ("B200", 2.25e15, 4.5e15),
    ("GB10", 62.0e12, 124.0e12),
    ("H200", 989e12, 1979e12),
    ("H100 PCIE", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H100", 989e12, 1979e12),
    ("H800", 989e12, 1979e12),
    ("GH200", 989e12, 1979e12),
    ("A100", 312e12, None),
    ("A800", 312e12, None),
    ("L40S", 362e12, 733e12),
    ("L4", 121e12, 242e12),
    ("A10G", 70e12, None),
    ("A10", 125e12, None),
    ("RTX 4090", 165e12, 330e12),
    ("RTX 3090", 71e12, None),
)


# Dense NVFP4 peaks, where the datasheet gives one; other devices fall back to their bf16 peak.
_NVFP4_PEAKS: tuple[tuple[str, float], ...] = (
    ("GB10", 500e12),
)


@dataclass(frozen=True)
class PeakFlops:
    flops: float
    source: str


def peak_flops(device_name: str, precision: str = "bf16") -> PeakFlops | None:
    """Peak FLOP/s for `device_name` at `precision` ('bf16', 'fp32' counts as bf16 tensor cores with tf32
    off-limits, so it is reported against bf16; 'fp8'; 'nvfp4'; a precision without a known peak for the device
    falls back to its bf16 peak, and the source says so), or None when the device is unknown.
    $NANOCHAT_PEAK_FLOPS overrides the table (read at call time)."""
    override = os.environ.get("NANOCHAT_PEAK_FLOPS")
    if override:
        try:
            flops = float(override)
        except ValueError:
            flops = math.nan
        if not (math.isfinite(flops) and flops > 0):
            raise UsageError(f"NANOCHAT_PEAK_FLOPS={override!r} is not a positive number of FLOP/s; set it to the "
                             "card's dense bf16 peak (e.g. 989e12) or unset it")
        return PeakFlops(flops, "NANOCHAT_PEAK_FLOPS")
    name = device_name.upper()
    if precision == "nvfp4":
        for key, nvfp4 in _NVFP4_PEAKS:
            if key in name:
                return PeakFlops(nvfp4, f"datasheet {key} nvfp4 dense")
    for key, bf16, fp8 in _PEAKS:
        if key in name:
            if precision == "fp8" and fp8 is not None:
                return PeakFlops(fp8, f"datasheet {key} fp8 dense")
            return PeakFlops(bf16, f"datasheet {key} bf16 dense")
    return None
