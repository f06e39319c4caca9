"""The step boundaries every training stage shares (base_train, mid_train and chat_sft, chat_rl).

Between two optimizer steps a stage evaluates when due (always at the last step, unless a resumed run
already evaluated that step), saves its final checkpoint and ends with 0 after the last step, saves and ends
with 75 when a stop signal arrived, and saves every `save_every` steps in between; a step whose loss is not
finite ends the run with 3 and keeps the last good checkpoint. `run_steps` is that policy; a stage supplies
what one step, one evaluation and one checkpoint are. `rng_and_optimizer_state` and
`restore_rng_and_optimizer` are the part of a checkpoint every stage writes and reads the same way;
`require_same_run` refuses to resume a checkpoint whose run was trained with other settings;
`step_to_resume` and `start_over` decide between resuming and starting over (--force, --no-resume).

`LossReadback` lets a stage read a step's loss (with any counts, and the duration) one step late on CUDA:
the next step's work is already queued when the host waits for the numbers, so the GPU never idles between
steps (reading them at once with `.item()` drains the queue and starts every step on an idle GPU). A stage
that defers its bookkeeping that way passes `settle`, which `run_steps` calls before anything that must see
every finished step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat import checkpoint as ckpt
from nanochat.configargs import EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE, UsageError
from nanochat.host_value import HostValue
from nanochat.runtime import Runtime, print0
from nanochat.stopping import StopRequest


@dataclass(frozen=True)
class StepSchedule:
    """When a run of `num_iterations` steps evaluates and saves (`eval_every`, `save_every` <= 0: never in
    between; `save_final` False: no checkpoint at the end either)."""

    num_iterations: int
    eval_every: int
    save_every: int
    save_final: bool = True

    def __post_init__(self) -> None:
        if self.num_iterations < 0:
            raise ValueError(f"num_iterations must not be negative, got {self.num_iterations}")

    def evaluation_due(self, step: int) -> bool:
        return step == self.num_iterations or (self.eval_every > 0 and step % self.eval_every == 0)

    def checkpoint_due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0 and step != self.num_iterations


def run_steps(step: int, schedule: StepSchedule, stop: StopRequest, runtime: Runtime, *,
              train_step: Callable[[int], bool], evaluate: Callable[[int], None],
              save: Callable[[int, bool], None], evaluations: list,
              settle: Callable[[], bool] = lambda: True) -> int:
    """Train from `step` to the end of `schedule`; returns EXIT_OK, EXIT_RESUMABLE or EXIT_DIVERGED.

    `train_step(step)` takes one optimizer step and returns False if a loss it read was not finite (after
    saying so); `evaluate(step)` appends an entry starting with the step to `evaluations` (the history a
    resumed run carries, so a step is not evaluated twice); `save(step, finished)` writes a checkpoint.
    `settle()` finishes the bookkeeping of a step `train_step` left pending (False: its loss was not
    finite); it runs before every evaluation, checkpoint and exit.
    """
    while True:
        last = step == schedule.num_iterations
        # A stop comes before a due evaluation (which may take minutes of a time limit's signal lead): the
        # resumed run evaluates this step, since it is not in `evaluations` yet.
        if not last and stop.check(step, runtime):
            if not settle():
                return EXIT_DIVERGED
            save(step, False)
            return EXIT_RESUMABLE
        already_evaluated = bool(evaluations) and evaluations[-1][0] == step
        evaluate_now = schedule.evaluation_due(step) and not already_evaluated
        if (evaluate_now or last) and not settle():
            return EXIT_DIVERGED
        if evaluate_now:
            evaluate(step)
        if last:
            if schedule.save_final:
                save(step, True)
            return EXIT_OK
        if not train_step(step):
            return EXIT_DIVERGED
        step += 1
        if schedule.checkpoint_due(step):
            if not settle():
                return EXIT_DIVERGED
            save(step, False)


class LossReadback:
    """A step's loss (or a 1-D tensor of the loss and counts) and duration on their way to the host
    (`nanochat.host_value.HostValue`).

    On CUDA reading waits only for the step's own work (`lagging`: read it after queueing the next step);
    the duration runs from an event recorded when the step's launch began (it fires when the GPU gets there,
    so a step queued behind another starts when that one ends) to the loss's copy. Elsewhere the work has
    run by the time the loss exists (CPU) or reading drains the queue anyway, so both are read at once."""

    def __init__(self, device: torch.device):
        self.lagging = device.type == "cuda"
        self._pending: tuple = ()

    def begin(self):
        """Mark the start of a step's launch; pass the mark to `start`."""
        if self.lagging:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            return mark
        return time.perf_counter()

    def start(self, numbers: torch.Tensor, began) -> None:
        """Begin bringing a step's numbers to the host: a 0-dim loss, or a 1-D tensor of the loss and counts
        (carried in float64, exact for counts below 2**53)."""
        finished = None if self.lagging else time.perf_counter()
        self._pending = (HostValue(numbers.detach().double()), began, finished)

    def read(self) -> tuple[float | list[float], float]:
        """(the loss, or the list of numbers, as given; seconds from the step's start to its numbers)."""
        numbers, began, done = self._pending
        value = numbers.read()
        return value, began.elapsed_time(numbers.event) / 1000 if self.lagging else done - began


def rng_and_optimizer_state(optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict:
    """The optimizer state and the random generators' states, as every stage's checkpoint carries them."""
    return {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device_type == "cuda" else None}


def restore_rng_and_optimizer(optimizer: torch.optim.Optimizer, state: dict, runtime: Runtime) -> None:
    """Undo `rng_and_optimizer_state`: the optimizer and the generators continue where the checkpoint left."""
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if runtime.device_type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"].cpu(), runtime.device)


def require_same_run(meta: dict, settings: dict[str, Any], where: str) -> None:
    """UsageError (one line) unless the checkpoint `meta` (at `where`) was trained with these `settings`: what
    decides the run's trajectory (its steps, batch, learning rates, data), recorded in the meta as
    `run_settings`. Resuming with others would silently continue a different run (a shorter one never ends)."""
    saved = meta.get("run_settings", {})
    current = json.loads(json.dumps(settings))
    differ = [name for name, value in current.items() if name in saved and saved[name] != value]
    if differ:
        flags = [f"--{name.replace('_', '-')}" for name in differ]
        raise UsageError(f"{where} was trained with {' '.join(f'{f} {saved[n]}' for f, n in zip(flags, differ))}, "
                         f"not {' '.join(f'{f} {current[n]}' for f, n in zip(flags, differ))}; pass those to "
                         "resume it, or start over with --force or another --model-tag")


def step_to_resume(directory: Path, user_config: dict[str, Any], resume: bool, force: bool) -> int | None:
    """The latest complete checkpoint in `directory` to continue from, or None to start over (--no-resume).
    --force starts over too, except from a stopped run of exactly this command (`user_config`), so that a
    requeued --force job goes on where it stopped instead of starting over at every requeue."""
    step = ckpt.latest_complete_step(directory) if resume else None
    if step is None or not force:
        return step
    meta = ckpt.read_meta(directory, step)
    same = json.loads(json.dumps(user_config, default=str)) == meta.get("user_config")
    return step if same and not meta.get("finished") else None


def start_over(directory: Path, runtime: Runtime) -> None:
    """Remove the checkpoints of the run a new one replaces (rank 0, before the new one saves anything): left
    there, the old run's higher steps would outrank the new run's checkpoints, and pruning would delete those."""
    if runtime.is_master:
        removed = ckpt.remove_checkpoints(directory)
        if removed:
            print0(runtime, f"starting over: removed the earlier run's checkpoints (steps {removed}) from {directory}")
    runtime.barrier()
