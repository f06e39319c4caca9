"""The shared step boundaries: when a run evaluates, saves, stops and ends (also for a stage that settles its
steps late), the loss readback, and the checkpointed RNG and optimizer state."""

import time

import pytest
import torch

from nanochat.configargs import EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE
from nanochat.optim import MuonAdamW
from nanochat.runtime import Runtime
from nanochat.step_loop import (
    LossReadback,
    StepSchedule,
    restore_rng_and_optimizer,
    rng_and_optimizer_state,
    run_steps,
)
from nanochat.stopping import StopRequest

CPU = Runtime(device=torch.device("cpu"), rank=0, local_rank=0, world_size=1, autocast_dtype=None)


class Recorder:
    """What run_steps asked for, in order: ("train", step), ("eval", step), ("save", step, finished)."""

    def __init__(self, stop: StopRequest | None = None, stop_before: int | None = None,
                 diverge_at: int | None = None):
        self.calls: list[tuple] = []
        self.evaluations: list[list] = []
        self.stop, self.stop_before, self.diverge_at = stop, stop_before, diverge_at

    def train_step(self, step: int) -> bool:
        self.calls.append(("train", step))
        if self.stop is not None and step + 1 == self.stop_before:
            self.stop.signal_name = "SIGUSR1"
        return step != self.diverge_at

    def evaluate(self, step: int) -> None:
        self.calls.append(("eval", step))
        self.evaluations.append([step, 1.0])

    def save(self, step: int, finished: bool) -> None:
        self.calls.append(("save", step, finished))

    def run(self, start: int, schedule: StepSchedule, stop: StopRequest | None = None) -> int:
        return run_steps(start, schedule, stop or self.stop or StopRequest(), CPU, train_step=self.train_step,
                         evaluate=self.evaluate, save=self.save, evaluations=self.evaluations)


class Deferred(Recorder):
    """A stage that logs each step late: train_step leaves it pending, settle finishes it."""

    def __init__(self, diverge_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pending: list[int] = []
        self.bad_step = diverge_at

    def train_step(self, step: int) -> bool:
        if not self.settle():
            return False
        self.calls.append(("train", step))
        if self.stop is not None and step + 1 == self.stop_before:
            self.stop.signal_name = "SIGUSR1"
        self.pending.append(step)
        return True

    def settle(self) -> bool:
        if not self.pending:
            return True
        step = self.pending.pop()
        self.calls.append(("settled", step))
        return step != self.bad_step

    def run(self, start: int, schedule: StepSchedule, stop: StopRequest | None = None) -> int:
        return run_steps(start, schedule, stop or self.stop or StopRequest(), CPU, train_step=self.train_step,
                         evaluate=self.evaluate, save=self.save, evaluations=self.evaluations, settle=self.settle)


def test_a_whole_run_evaluates_and_saves_on_schedule_and_at_the_end():
    recorder = Recorder()
    assert recorder.run(0, StepSchedule(num_iterations=5, eval_every=2, save_every=3)) == EXIT_OK
    assert recorder.calls == [
        ("eval", 0), ("train", 0), ("train", 1), ("eval", 2), ("train", 2), ("save", 3, False),
        ("train", 3), ("eval", 4), ("train", 4), ("eval", 5), ("save", 5, True)]


def test_without_periodic_work_only_the_end_is_evaluated_and_saved():
    recorder = Recorder()
    assert recorder.run(0, StepSchedule(num_iterations=2, eval_every=-1, save_every=0)) == EXIT_OK
    assert recorder.calls == [("train", 0), ("train", 1), ("eval", 2), ("save", 2, True)]


def test_save_final_false_writes_no_checkpoint():
    recorder = Recorder()
    assert recorder.run(0, StepSchedule(num_iterations=2, eval_every=0, save_every=0, save_final=False)) == EXIT_OK
    assert [call for call in recorder.calls if call[0] == "save"] == []


def test_a_resumed_run_does_not_evaluate_its_first_step_again():
    recorder = Recorder()
    recorder.evaluations.append([4, 1.0])
    assert recorder.run(4, StepSchedule(num_iterations=6, eval_every=2, save_every=0)) == EXIT_OK
    assert recorder.calls == [("train", 4), ("train", 5), ("eval", 6), ("save", 6, True)]


def test_a_finished_run_resumed_at_its_end_only_saves():
    recorder = Recorder()
    recorder.evaluations.append([3, 1.0])
    assert recorder.run(3, StepSchedule(num_iterations=3, eval_every=1, save_every=1)) == EXIT_OK
    assert recorder.calls == [("save", 3, True)]


def test_a_stop_signal_saves_at_the_next_boundary_and_returns_75():
    stop = StopRequest()
    recorder = Recorder(stop=stop, stop_before=2)
    assert recorder.run(0, StepSchedule(num_iterations=10, eval_every=0, save_every=0)) == EXIT_RESUMABLE
    assert recorder.calls == [("train", 0), ("train", 1), ("save", 2, False)]



def test_a_stop_saves_before_a_due_evaluation_which_the_resumed_run_then_makes():
    stop = StopRequest()
    recorder = Recorder(stop=stop, stop_before=2)
    schedule = StepSchedule(num_iterations=4, eval_every=2, save_every=0)
    assert recorder.run(0, schedule) == EXIT_RESUMABLE
    assert recorder.calls == [("eval", 0), ("train", 0), ("train", 1), ("save", 2, False)]
    recorder.calls.clear()
    assert recorder.run(2, schedule, stop=StopRequest()) == EXIT_OK
    assert recorder.calls == [("eval", 2), ("train", 2), ("train", 3), ("eval", 4), ("save", 4, True)]


def test_a_diverged_step_ends_the_run_with_3_and_saves_nothing_more():
    recorder = Recorder(diverge_at=1)
    assert recorder.run(0, StepSchedule(num_iterations=10, eval_every=0, save_every=1)) == EXIT_DIVERGED
    assert recorder.calls == [("train", 0), ("save", 1, False), ("train", 1)]


def test_deferred_steps_are_settled_before_every_evaluation_checkpoint_and_the_end():
    recorder = Deferred()
    assert recorder.run(0, StepSchedule(num_iterations=4, eval_every=2, save_every=3)) == EXIT_OK
    assert recorder.calls == [
        ("eval", 0), ("train", 0), ("settled", 0), ("train", 1), ("settled", 1), ("eval", 2), ("train", 2),
        ("settled", 2), ("save", 3, False), ("train", 3), ("settled", 3), ("eval", 4), ("save", 4, True)]


def test_a_deferred_step_is_settled_before_the_stop_checkpoint():
    stop = StopRequest()
    recorder = Deferred(stop=stop, stop_before=2)
    assert recorder.run(0, StepSchedule(num_iterations=10, eval_every=0, save_every=0)) == EXIT_RESUMABLE
    assert recorder.calls == [("train", 0), ("settled", 0), ("train", 1), ("settled", 1), ("save", 2, False)]


@pytest.mark.parametrize("bad_step, schedule", [
    (1, StepSchedule(num_iterations=5, eval_every=0, save_every=0)),   # found by the next train_step
    (1, StepSchedule(num_iterations=2, eval_every=0, save_every=0)),   # found before the final evaluation
    (0, StepSchedule(num_iterations=5, eval_every=0, save_every=1)),   # found before a checkpoint
])
def test_a_deferred_step_that_diverged_ends_the_run_before_anything_is_saved_after_it(bad_step, schedule):
    recorder = Deferred(diverge_at=bad_step)
    assert recorder.run(0, schedule) == EXIT_DIVERGED
    assert recorder.calls[-1] == ("settled", bad_step)
    assert not [call for call in recorder.calls if call[0] in ("save", "eval") and call[1] > bad_step]


def test_loss_readback_off_cuda_reads_at_once():
    readback = LossReadback(torch.device("cpu"))
    assert not readback.lagging
    began = readback.begin()
    time.sleep(0.01)
    readback.start(torch.tensor(2.5, dtype=torch.bfloat16), began)
    loss, seconds = readback.read()
    assert loss == 2.5 and 0.01 <= seconds < 5
    # a loss with counts: every number read back as given, counts exact beyond float32's 2**24
    readback.start(torch.tensor([7.25, 2.0 ** 30 + 1, 3.0], dtype=torch.float64), readback.begin())
    assert readback.read()[0] == [7.25, 2.0 ** 30 + 1, 3.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_readback_on_cuda_reads_the_numbers_it_was_given_while_later_work_is_queued():
    readback = LossReadback(torch.device("cuda"))
    assert readback.lagging
    for value in (1.5, 3.25, [2.5, 2.0 ** 30 + 1, 4.0]):
        began = readback.begin()
        loss = torch.tensor(value, device="cuda", dtype=torch.float64)
        torch.cuda._sleep(10_000_000)  # the step's own work: millions of GPU cycles before its loss
        readback.start(loss, began)
        loss.fill_(-1.0)  # queued after the copy: must not change what is read
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(8):
            big = big @ big / 64
        read, seconds = readback.read()
        assert read == value and 0 < seconds < 5


def test_schedule_validation():
    with pytest.raises(ValueError, match="num_iterations"):
        StepSchedule(num_iterations=-1, eval_every=1, save_every=1)


def test_rng_and_optimizer_state_round_trip():
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = MuonAdamW([dict(params=[param], kind="adamw", lr=0.1)])
    param.grad = torch.ones(4, 3)
    optimizer.step()
    state = rng_and_optimizer_state(optimizer, CPU)
    expected = torch.rand(3)

    torch.manual_seed(1234)
    other = MuonAdamW([dict(params=[param], kind="adamw", lr=0.1)])
    restore_rng_and_optimizer(other, state, CPU)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(other.state[param]["exp_avg"], optimizer.state[param]["exp_avg"])
