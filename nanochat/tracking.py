"""Optional wandb tracking of a training stage: off unless the stage is given a run name other than 'dummy'.

wandb is imported only when a run is asked for (it is slow to import). A run name without wandb installed
is a usage error found when the config is validated, before any work starts.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from nanochat.configargs import UsageError

TRACKING_OFF = "dummy"
DEFAULT_PROJECT = "nanochat"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def require_tracker(run_name: str) -> None:
    """Raise UsageError when `run_name` asks for wandb and wandb is not installed."""
    if run_name != TRACKING_OFF and not wandb_installed():
        raise UsageError(f"--run {run_name} logs to wandb, which is not installed: "
                         f"pip install wandb, or leave out --run")


def start_tracking(run_name: str, is_master: bool, config: dict[str, Any], job_type: str | None = None):
    """The wandb run rank 0 logs to, or None (tracking off, or another rank).

    The project is $WANDB_PROJECT when set (the launcher's WANDB_PROJECT key), else 'nanochat'.
    """
    require_tracker(run_name)
    if run_name == TRACKING_OFF or not is_master:
        return None
    import wandb

    return wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name,
                      job_type=job_type, config=config)
