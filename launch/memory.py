"""Rough GPU-memory and disk estimates from the model shape, for preflight and the 40 GB batch rule.

Peak training memory per GPU is estimated as
    34 bytes x width x seq x batch x depth      activations kept for backward (bf16, fused attention)
  +  4 bytes x seq x batch x vocab              fp32 logits
  + 16 bytes x parameters                       weights, gradients and optimizer state
with parameters ~ 12 x depth x width^2 + 2 x vocab x width. Checked against one H100 80 GB (README
reference figures, vocab 32768, seq 2048, batch 32): depth 20 estimates 73 GB (measured 74.5), depth 12
estimates 31 GB (measured 29.4). It is a guard against gross misfits, not an allocator model: preflight
refuses only beyond MEMORY_REFUSE_FACTOR and warns in between.

Disk per training stage: two checkpoints on disk at once (the new one is complete before the old one
goes), each ~12 bytes per parameter (fp32 weights plus optimizer state).
"""

from __future__ import annotations

DEFAULT_ASPECT_RATIO = 64  # nanochat's width per layer when --aspect-ratio is not given
MEMORY_REFUSE_FACTOR = 1.15
CHECKPOINT_BYTES_PER_PARAM = 12
CHECKPOINTS_ON_DISK = 2
SMALL_STAGE_BYTES = 100 * 10**6  # tokenizer, evals, report: outputs of a few MB, rounded up


def model_width(depth: int, aspect_ratio: int | None) -> int:
    return depth * (aspect_ratio or DEFAULT_ASPECT_RATIO)


def estimate_params(depth: int, width: int, vocab_size: int) -> int:
    return 12 * depth * width**2 + 2 * vocab_size * width


def estimate_peak_gb(depth: int, width: int, seq_len: int, batch: int, vocab_size: int) -> float:
    activations = 34 * width * seq_len * batch * depth
    logits = 4 * seq_len * batch * vocab_size
    states = 16 * estimate_params(depth, width, vocab_size)
    return (activations + logits + states) / 1e9


def training_stage_disk_bytes(depth: int, width: int, vocab_size: int) -> int:
    return CHECKPOINTS_ON_DISK * CHECKPOINT_BYTES_PER_PARAM * estimate_params(depth, width, vocab_size)
