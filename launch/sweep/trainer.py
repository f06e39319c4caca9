"""The sweep's view of the base trainer: which settings a menu may vary, and the trainer's own checks.

`scripts.base_train` (and so torch) is imported only when one of these is called, so `python -m launch`
stays light. The sweep owns the run length, evaluation and bookkeeping settings (`SWEEP_CONTROLLED`);
every other field of `BaseTrainConfig` may be a knob or a fixed value of a menu.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

SWEEP_CONTROLLED = frozenset({
    "num_iterations", "target_flops", "target_param_data_ratio", "eval_every", "eval_tokens", "sample_every",
    "save_every", "keep_checkpoints", "model_tag", "run", "resume", "force", "save_final",
})
KNOBS_THE_TRAINER_LACKS = {
    "n_kv_head_ratio": "base_train has no --n-kv-head-ratio (nanochat.scaling.derive supports it; the trainer "
                       "always uses one key/value head per query head)",
}


def _config_class():
    from scripts.base_train import BaseTrainConfig

    return BaseTrainConfig


def setting_types() -> dict[str, tuple[type, tuple]]:
    """Menu-settable field -> (base type, allowed values or ()) of `BaseTrainConfig`."""
    cls = _config_class()
    hints = typing.get_type_hints(cls)
    found: dict[str, tuple[type, tuple]] = {}
    for field in dataclasses.fields(cls):
        if field.name in SWEEP_CONTROLLED:
            continue
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is Literal:
            found[field.name] = (type(args[0]), tuple(args))
        elif args and typing.get_origin(hint) in (typing.Union, types.UnionType):
            found[field.name] = (args[0], ())
        else:
            found[field.name] = (hint, ())
    return found


def trainer_defaults() -> dict[str, Any]:
    """Default value of every menu-settable field."""
    return {f.name: f.default for f in dataclasses.fields(_config_class()) if f.name not in SWEEP_CONTROLLED}


def sweep_controlled_settings(steps: int, val_tokens: int, model_tag: str) -> dict[str, Any]:
    """What the sweep sets for every candidate: a fixed step budget, one evaluation at the end, no samples,
    no intermediate checkpoints, no final checkpoint, a fresh start in the candidate's own folder."""
    return {"num_iterations": steps, "eval_every": steps, "eval_tokens": val_tokens, "sample_every": -1,
            "save_every": -1, "model_tag": model_tag, "run": "dummy", "resume": False, "force": True,
            "save_final": False}


def build_config(settings: Mapping[str, Any]):
    """`BaseTrainConfig(**settings)`; its validation raises UsageError."""
    return _config_class()(**settings)


def trainer_rejection(settings: Mapping[str, Any], vocab_size: int, world_size: int = 1) -> str | None:
    """Why base_train would refuse these settings (its config validation, then `derive`), or None."""
    from nanochat.scaling import derive

    try:
        config = build_config(settings)
    except (ValueError, TypeError) as exc:
        return f"base_train: {exc}"
    try:
        derive(config.depth, aspect_ratio=config.aspect_ratio, head_dim=config.head_dim,
               max_seq_len=config.max_seq_len, vocab_size=vocab_size, window_pattern=config.window_pattern,
               device_batch_size=config.device_batch_size, world_size=world_size,
               total_batch_size=config.total_batch_size, num_iterations=config.num_iterations)
    except ValueError as exc:
        return f"derive: {exc}"
    return None
