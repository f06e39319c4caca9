"""How candidates are chosen: the full grid, random draws, or successive halving over random draws.

All three are deterministic for a given menu and seed, which is what lets a killed sweep resume: it
recomputes the same candidates and skips those the trajectory already holds. Successive halving runs every
candidate for a short budget, keeps the best 1/eta (by validation bits per byte, diverged ones dropped),
multiplies the budget by eta, and repeats until the last rung runs the full `--steps`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

from launch.sweep.candidates import Candidate
from launch.sweep.menu import Menu, RangeKnob
from nanochat.configargs import UsageError

MAX_DRAWS_PER_CANDIDATE = 50
MIN_RUNG_STEPS = 2


def grid_candidates(menu: Menu, count: int | None, seed: int) -> list[Candidate]:
    """Every combination in menu order; with `count` below the grid size, a seeded subset of it."""
    names = [knob.name for knob in menu.knobs]
    combos = [dict(zip(names, values, strict=True))
              for values in itertools.product(*(knob.grid_values() for knob in menu.knobs))]
    if count is not None and count < len(combos):
        keep = sorted(random.Random(seed).sample(range(len(combos)), count))
        combos = [combos[i] for i in keep]
    return [Candidate(c) for c in combos]


def random_candidates(menu: Menu, count: int, seed: int) -> list[Candidate]:
    """`count` distinct draws (fewer when the menu has fewer distinct combinations)."""
    rng = random.Random(seed)
    found: dict[str, Candidate] = {}
    for _ in range(count * MAX_DRAWS_PER_CANDIDATE):
        if len(found) == count:
            break
        candidate = Candidate({knob.name: knob.sample(rng) for knob in menu.knobs})
        found.setdefault(candidate.id, candidate)
    return list(found.values())


def initial_candidates(menu: Menu, strategy: str, count: int | None, seed: int) -> list[Candidate]:
    if strategy == "grid":
        return grid_candidates(menu, count, seed)
    if count is None:
        raise UsageError(f"--strategy {strategy} needs --candidates N (or candidates = N in the menu's [sweep])")
    if strategy == "halving" and not any(isinstance(k, RangeKnob) for k in menu.knobs):
        grid = grid_candidates(menu, count, seed)
        if len(grid) <= count:
            return grid
    return random_candidates(menu, count, seed)


def halving_budgets(candidates: int, steps: int, eta: int, min_steps: int = MIN_RUNG_STEPS) -> list[int]:
    """Steps per rung, ending at `steps`: as many rungs as both the pool (divided by eta each rung) and the
    step budget (divided by eta going back) allow."""
    if eta < 2:
        raise UsageError(f"--eta must be at least 2, got {eta}")
    rungs = 1
    while candidates > eta ** rungs and steps // eta ** rungs >= min_steps:
        rungs += 1
    return [steps // eta ** (rungs - 1 - r) for r in range(rungs)]


def survivors(results: Sequence[tuple[str, float | None]], eta: int) -> list[str]:
    """Ids of the best ceil(n / eta) by bits per byte (lower is better); None (diverged, failed) never survive."""
    keep = math.ceil(len(results) / eta)
    ranked = sorted((bpb, cid) for cid, bpb in results if bpb is not None)
    return [cid for _, cid in ranked[:keep]]
