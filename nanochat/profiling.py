"""Kernel tables from `torch.profiler`: where a benchmark's time goes, kernel by kernel.

`profile_steps(run_step, steps, device_type)` profiles `steps` calls of `run_step` and returns a
`KernelTable`: on CUDA the GPU kernels (and copies) ranked by their own device time, elsewhere the operators
ranked by their own CPU time, each with its time and call count per step and its share of the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class KernelTime:
    name: str
    ms_per_step: float
    calls_per_step: float
    share: float


@dataclass(frozen=True)
class KernelTable:
    total_ms_per_step: float
    calls_per_step: float
    rows: list[KernelTime]
    unit: str  # "kernels" (CUDA) or "operators" (CPU)

    def lines(self, limit: int, width: int = 100) -> list[str]:
        """The table as text: a header with the totals, then the `limit` most expensive rows."""
        out = [f"{self.total_ms_per_step:.3f} ms per step in {self.calls_per_step:.0f} {self.unit}"]
        for row in self.rows[:limit]:
            out.append(f"{row.ms_per_step:9.3f} ms {100 * row.share:5.1f}% {row.calls_per_step:7.1f}/step  "
                       f"{row.name[:width]}")
        return out

    def as_json(self, limit: int) -> dict:
        return {"total_ms_per_step": round(self.total_ms_per_step, 3), "calls_per_step": self.calls_per_step,
                "top": [{"name": r.name, "ms_per_step": round(r.ms_per_step, 3),
                         "calls_per_step": r.calls_per_step, "share": round(r.share, 4)}
                        for r in self.rows[:limit]]}


def _self_time_us(event, on_device: bool) -> float:
    if on_device:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def profile_steps(run_step: Callable[[], object], steps: int, device_type: str) -> KernelTable:
    """Run `run_step` `steps` times under the profiler (synchronising at the end) and rank what ran."""
    if steps < 1:
        raise ValueError(f"profile_steps needs at least one step, got {steps}")
    on_device = device_type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_device else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run_step()
        if on_device:
            torch.cuda.synchronize()
    timed = [(_self_time_us(event, on_device), event.count, event.key) for event in profiler.key_averages()]
    timed = sorted((row for row in timed if row[0] > 0), reverse=True)
    total_us = sum(us for us, _, _ in timed)
    rows = [KernelTime(name, us / steps / 1000, count / steps, us / total_us) for us, count, name in timed]
    return KernelTable(total_us / steps / 1000, sum(count for _, count, _ in timed) / steps, rows,
                       "kernels" if on_device else "operators")
