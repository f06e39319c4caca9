"""Graceful stop on SIGUSR1 / SIGUSR2 / SIGTERM: the handler only sets a flag; the training loop checks it
at the next step boundary, saves a checkpoint and exits with EXIT_RESUMABLE (75).

SLURM sends USR1 (or USR2, which submitit uses because NCCL may own USR1) shortly before a time limit;
cloud schedulers send TERM. Under torch.distributed every rank must stop at the same step, so the flag is
combined across ranks with an all-reduce (`should_stop`).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from nanochat.configargs import EXIT_RESUMABLE
from nanochat.runtime import Runtime, print0

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> StopRequest:
        """Install the handlers (only possible from the main thread; elsewhere this is a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def should_stop(self, device: torch.device, distributed: bool) -> bool:
        """True on every rank if any rank received a stop signal."""
        if not distributed:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def check(self, step: int, runtime: Runtime) -> bool:
        """`should_stop` at a step boundary, announced once (rank 0) with what happens next."""
        if not self.should_stop(runtime.device, runtime.distributed):
            return False
        print0(runtime, f"step {step:06d} | {self.signal_name or 'stop'} received: saving and exiting "
                        f"{EXIT_RESUMABLE} (run the same command again to resume)")
        return True
