"""Candidates: a knob assignment, its stable id, its full trainer settings, its shape, and why it may not run.

The id is a hash of the knob values alone, so the same assignment gets the same id in every sweep that
uses the menu, and a resumed sweep recognises what it already recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from launch.sweep import trainer
from launch.sweep.expressions import ConstraintError
from launch.sweep.menu import Menu

# settings that change the compiled graphs: candidates sharing them run back to back
SHAPE_SETTINGS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "window_pattern",
                  "precision", "kernel", "compile", "device_type")


def candidate_id(knobs: Mapping[str, Any]) -> str:
    text = json.dumps(dict(knobs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Candidate:
    knobs: dict[str, Any]

    @property
    def id(self) -> str:
        return candidate_id(self.knobs)

    def settings(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The menu-settable trainer settings: `base` (trainer defaults, site, [fixed]) under the knobs."""
        return {**base, **self.knobs}


def shape_key(settings: Mapping[str, Any]) -> tuple:
    return tuple(str(settings.get(name)) for name in SHAPE_SETTINGS)


def order_by_shape(candidates: list[Candidate], base: Mapping[str, Any]) -> list[Candidate]:
    """Same-shape candidates next to each other (first appearance order), so compiled graphs are reused."""
    first_seen: dict[tuple, int] = {}
    for candidate in candidates:
        first_seen.setdefault(shape_key(candidate.settings(base)), len(first_seen))
    return sorted(candidates, key=lambda c: first_seen[shape_key(c.settings(base))])


def rejection_reason(candidate: Candidate, menu: Menu, base: Mapping[str, Any], steps: int, val_tokens: int,
                     vocab_size: int) -> str | None:
    """Why this candidate must not run (a menu constraint, base_train's validation, `derive`), or None."""
    settings = candidate.settings(base)
    for constraint in menu.constraints:
        try:
            if not constraint.holds(settings):
                shown = ", ".join(f"{n}={settings[n]!r}" for n in sorted(constraint.names))
                return f"constraint {constraint.name} ({constraint.text}) is false for {shown}"
        except ConstraintError as exc:
            return f"constraint {constraint.name} ({constraint.text}) cannot be evaluated: {exc}"
    full = {**settings, **trainer.sweep_controlled_settings(steps, val_tokens, candidate.id)}
    return trainer.trainer_rejection(full, vocab_size)
