"""A small device value brought to the host without draining the GPU queue.

`HostValue(tensor)` starts the copy. On CUDA it goes into pinned memory behind an event, so `read()` waits
only for the work queued before it, never for work queued after (reading with `.item()` would wait for
everything and leave the GPU idle until the host queues more). Elsewhere the tensor itself is kept: CPU
work has run by the time it exists, and other devices drain on reading anyway.
"""

from __future__ import annotations

import torch


class HostValue:
    def __init__(self, value: torch.Tensor):
        self.event: torch.cuda.Event | None = None  # recorded after the copy (timing enabled), CUDA only
        if value.is_cuda:
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self._host = value

    def read(self) -> float | list:
        """The value (a number for a 0-dim tensor, else nested lists), once the work queued before the copy
        has finished."""
        if self.event is not None:
            self.event.synchronize()
        return self._host.tolist()
