"""Learning-rate and momentum schedules as pure functions of the step (so a resumed run gets the same values).

Warmup -> constant -> warmdown: the multiplier rises linearly over the first `warmup_ratio` of the run,
stays at 1, then falls linearly to `final_lr_frac` over the last `warmdown_ratio`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.num_iterations <= 0:
            raise ValueError("the schedule needs num_iterations > 0")
        if not (0.0 <= self.warmup_ratio <= 1.0 and 0.0 <= self.warmdown_ratio <= 1.0):
            raise ValueError("warmup and warmdown ratios must be in [0, 1]")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ValueError("warmup_ratio + warmdown_ratio must not exceed 1")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ValueError("final_lr_frac must be in [0, 1]")

    def multiplier(self, step: int) -> float:
        warmup = round(self.warmup_ratio * self.num_iterations)
        warmdown = round(self.warmdown_ratio * self.num_iterations)
        if step < warmup:
            return (step + 1) / warmup
        if step <= self.num_iterations - warmdown:
            return 1.0
        progress = (self.num_iterations - step) / warmdown
        return progress + (1.0 - progress) * self.final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon's momentum ramps from `start` to `end` over the first `ramp_steps` steps."""
    frac = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return (1 - frac) * start + frac * end
