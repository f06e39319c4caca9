"""Graceful stop on SIGUSR1 / SIGUSR2 / SIGTERM / a first Ctrl-C: the handler only sets a flag; the training
loop checks it at the next step boundary, saves a checkpoint and exits with EXIT_RESUMABLE (75).

A first Ctrl-C (SIGINT) says so on stderr and stops the same way, so interrupting a run on a laptop keeps
its progress; a second Ctrl-C raises KeyboardInterrupt as usual and quits without saving.

A StopRequest installed while another one's handlers are in place (the recipe lab runs each candidate's
trainer inside the sweep's) passes every signal on to that outer one and starts with its request, so a stop
that comes while the trainer cannot act on it (before its handlers exist, during its last evaluation) still
stops the sweep.

A stage the launcher runs starts with USR1/USR2 ignored (the launcher passes a TERM on to a training stage
as USR2), so a signal that comes before its StopRequest is installed, during its imports, data checks and
model build, would be lost. The launcher therefore first writes the signal's name to the file named by
$NANOCHAT_STOP_FILE, then signals the stage; `install` reads that file after putting its handlers in
place: a stop that came earlier is requested at once, one that comes later finds the handlers.

SLURM sends USR1 (or USR2, which submitit uses because NCCL may own USR1) shortly before a time limit;
cloud schedulers send TERM. Under torch.distributed every rank must stop at the same step, so the flag is
combined across ranks with an all-reduce (`should_stop`). That vote is read one boundary after it was
cast: reading it at once would make every rank wait for its GPU to finish all queued work at every step.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.configargs import EXIT_RESUMABLE, STOP_FILE_ENV
from nanochat.host_value import HostValue
from nanochat.runtime import Runtime, launched_as_rank0, print0

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
INTERRUPT_NOTE = (f"\nCtrl-C: saving a checkpoint at the end of this step, then exiting {EXIT_RESUMABLE} (run the "
                  "same command again to resume); press Ctrl-C again to quit without saving\n").encode()


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._vote: _StopVote | None = None  # cast at the previous boundary (distributed only)
        self._outer: StopRequest | None = None  # whose handlers this one's replaced

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._outer is not None:
            self._outer._handle(signum, _frame)

    def _handle_interrupt(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C quits at once
        if launched_as_rank0():
            os.write(2, INTERRUPT_NOTE)
        self._handle(signum, frame)

    def install(self) -> StopRequest:
        """Install the handlers (only possible from the main thread; elsewhere only the launcher's stop file
        is read), then take over a stop requested before: the outer StopRequest's, or the launcher's."""
        if threading.current_thread() is threading.main_thread():
            outer = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            self._outer = outer if isinstance(outer, StopRequest) and outer is not self else None
            if self._outer is not None:
                self.signal_name = self._outer.signal_name
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
            signal.signal(signal.SIGINT, self._handle_interrupt)
        earlier = launcher_stop_request()
        if earlier is not None and self.signal_name is None:  # never None over a name a handler just set
            self.signal_name = earlier
        return self

    def should_stop(self, device: torch.device, distributed: bool) -> bool:
        """True on every rank, at the same boundary, once any rank has received a stop signal.

        One process: at the first boundary after the signal. Distributed: every boundary casts a vote (an
        all-reduce queued behind the work already launched) and acts on the previous boundary's, so a signal
        takes effect one boundary later and no rank waits for its GPU to drain."""
        if not distributed:
            return self.requested
        previous, self._vote = self._vote, _StopVote(self.requested, device)
        return previous is not None and previous.result()

    def check(self, step: int, runtime: Runtime) -> bool:
        """`should_stop` at a step boundary, announced once (rank 0) with what happens next."""
        if not self.should_stop(runtime.device, runtime.distributed):
            return False
        print0(runtime, f"step {step:06d} | {self.signal_name or 'stop'} received: saving and exiting "
                        f"{EXIT_RESUMABLE} (run the same command again to resume)")
        return True


def launcher_stop_request() -> str | None:
    """The signal name the launcher wrote to $NANOCHAT_STOP_FILE ("stop" if it is still empty), or None."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or "stop"
    except FileNotFoundError:
        return None


class _StopVote:
    """One boundary's stop flag, all-reduced (MAX) over ranks; reading it waits only for the work queued
    before the vote (`nanochat.host_value.HostValue`), or for the collective itself on gloo."""

    def __init__(self, requested: bool, device: torch.device):
        flag = torch.full((1,), int(requested), dtype=torch.int32, device=device)  # no host-to-device copy
        self._work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if flag.is_cuda:
            self._work.wait()  # the stream waits for the collective; the host does not
        self._value = HostValue(flag)

    def result(self) -> bool:
        self._work.wait()
        return bool(self._value.read()[0])
