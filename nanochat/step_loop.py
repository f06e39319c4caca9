"""The step boundaries every training stage shares (base_train, mid_train and chat_sft, chat_rl).

Between two optimizer steps a stage evaluates when due (always at the last step, unless a resumed run
already evaluated that step), saves its final checkpoint and ends with 0 after the last step, saves and ends
with 75 when a stop signal arrived, and saves every `save_every` steps in between; a step whose loss is not
finite ends the run with 3 and keeps the last good checkpoint. `run_steps` is that policy; a stage supplies
what one step, one evaluation and one checkpoint are. `rng_and_optimizer_state` and
`restore_rng_and_optimizer` are the part of a checkpoint every stage writes and reads the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanochat.configargs import EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE
from nanochat.runtime import Runtime
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
              save: Callable[[int, bool], None], evaluations: list) -> int:
    """Train from `step` to the end of `schedule`; returns EXIT_OK, EXIT_RESUMABLE or EXIT_DIVERGED.

    `train_step(step)` takes one optimizer step and returns False if its loss was not finite (after saying
    so); `evaluate(step)` appends an entry starting with the step to `evaluations` (the history a resumed
    run carries, so a step is not evaluated twice); `save(step, finished)` writes a checkpoint.
    """
    while True:
        last = step == schedule.num_iterations
        already_evaluated = bool(evaluations) and evaluations[-1][0] == step
        if schedule.evaluation_due(step) and not already_evaluated:
            evaluate(step)
        if last:
            if schedule.save_final:
                save(step, True)
            return EXIT_OK
        if stop.check(step, runtime):
            save(step, False)
            return EXIT_RESUMABLE
        if not train_step(step):
            return EXIT_DIVERGED
        step += 1
        if schedule.checkpoint_due(step):
            save(step, False)


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
