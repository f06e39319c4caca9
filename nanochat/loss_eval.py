"""Bits per byte: a tokenizer-independent validation loss, and a unigram baseline to compare it with.

bpb = (sum of per-token cross-entropy in nats) / (ln 2 * sum of the UTF-8 bytes those tokens stand for).
Special tokens (byte length 0) and ignored targets (-1) count in neither sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 autocast=None, distributed: bool = False) -> float:
    """Bits per byte of `model` over `batches` of (inputs, targets); summed over all ranks when distributed."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        if autocast is not None:
            with autocast:
                losses = model(x, y, loss_reduction="none")
        else:
            losses = model(x, y, loss_reduction="none")
        losses = losses.reshape(-1).double()
        targets = y.reshape(-1)
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets))
        counted = nbytes > 0
        total_nats += (losses * counted).sum()
        total_bytes += nbytes.sum()
    if distributed:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return (total_nats / (math.log(2) * total_bytes.double())).item()


class UnigramBaseline:
    """Bits per byte of a unigram model (token frequencies seen in training, add-one smoothed), measured on
    the same batches as the model by wrapping them with `observing`. A model that has learned anything
    beyond token frequencies must beat it."""

    def __init__(self, train_counts: torch.Tensor, token_bytes: torch.Tensor) -> None:
        counts = train_counts.double().to(token_bytes.device) + 1.0
        self.log_probs = counts.log() - counts.sum().log()
        self.token_bytes = token_bytes
        self.total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
        self.total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)

    @torch.no_grad()
    def observe(self, targets: torch.Tensor) -> None:
        targets = targets.reshape(-1).to(self.token_bytes.device)
        targets = targets[targets >= 0]
        nbytes = self.token_bytes[targets]
        self.total_nats -= (self.log_probs[targets] * (nbytes > 0)).sum()
        self.total_bytes += nbytes.sum()

    def observing(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        for x, y in batches:
            self.observe(y)
            yield x, y

    def bpb(self, distributed: bool = False) -> float:
        nats, nbytes = self.total_nats.clone(), self.total_bytes.clone()
        if distributed:
            dist.all_reduce(nats)
            dist.all_reduce(nbytes)
        return (nats / (math.log(2) * nbytes.double())).item() if nbytes.item() else float("inf")
