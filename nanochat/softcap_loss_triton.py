"""The output head's softcapped cross-entropy and its logit gradient in one Triton kernel (CUDA training).

`softcap_head_loss(hidden, weight, targets, token_weights, softcap)` computes logits = hidden @ weight^T in
the inputs' dtype, then, one program per row, overwrites each row of logits with
token_weight * d loss / d logits and returns the per-token losses in float32. Each row is read twice (in
blocks; the normaliser, then the gradient) and written once; nothing else of size (rows x vocab) is read
or written, and no float32 copy of the logits exists.

The softcap makes one pass enough for the normaliser: capped logits lie in [-cap, cap], so
sum(exp(capped - cap)) needs no running maximum and cannot overflow (nor underflow, for caps up to
`nanochat.kernels.FUSED_MAX_SOFTCAP`). With r = 1 / (1 + exp(2 x / cap)): tanh(x / cap) = 1 - 2r,
capped - cap = -2 cap r, and the tanh derivative 1 - tanh² = 4 r (1 - r) stays accurate where tanh
saturates. A target of `IGNORE_INDEX` gives loss 0 and a zero gradient row (its token weight should be 0
too).

The function is a `torch.library` custom op, opaque to torch.compile, so the graph keeps the in-place
kernel and the logits buffer is reused for the gradient. Importing this module needs triton; with
`TRITON_INTERPRET=1` set before the import the kernel runs on CPU tensors (how the tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanochat.kernels import FUSED_MAX_SOFTCAP, IGNORE_INDEX

_LOG2_E = 1.4426950408889634
# Measured on an H100 at vocab 32768: 4096-logit blocks and 8 warps walk a row in 4.3 ms per 65536 rows;
# keeping a whole row in registers (one read instead of two) was slower, 5.2-5.6 ms.
_BLOCK = 4096
_WARPS = 8


@triton.jit
def _saturation(x, to_exponent):
    """r = 1 / (1 + exp(2 x / cap)), from which tanh(x / cap) = 1 - 2 r."""
    return 1.0 / (1.0 + tl.exp2(x * to_exponent))


@triton.jit
def _softcap_cross_entropy_rows(logits_ptr, targets_ptr, token_weights_ptr, losses_ptr, vocab, row_stride,
                                softcap, IGNORE: tl.constexpr, LOG2_E: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    to_exponent = 2.0 * LOG2_E / softcap
    shifted_scale = -2.0 * softcap * LOG2_E  # exp(capped - cap) = exp2(shifted_scale * r)
    partial_sums = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        r = _saturation(tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32), to_exponent)
        partial_sums += tl.where(inside, tl.exp2(shifted_scale * r), 0.0)
    row_sum = tl.sum(partial_sums, axis=0)

    target = tl.load(targets_ptr + row)
    counted = target != IGNORE
    safe_target = tl.where(counted, target, 0)
    target_r = _saturation(tl.load(row_ptr + safe_target).to(tl.float32), to_exponent)
    tl.store(losses_ptr + row, tl.where(counted, tl.log(row_sum) + 2.0 * softcap * target_r, 0.0))

    token_weight = tl.load(token_weights_ptr + row)
    probability_scale = token_weight / row_sum
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        r = _saturation(tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32), to_exponent)
        target_part = tl.where((cols == safe_target) & counted, token_weight, 0.0)
        grad = (tl.exp2(shifted_scale * r) * probability_scale - target_part) * (4.0 * r * (1.0 - r))
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


@torch.library.custom_op("nanochat::softcap_head_loss", mutates_args=())
def softcap_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      token_weights: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, d), weight (V, d) of one dtype, targets (N,) int64, token_weights (N,) float32.

    Returns (losses (N,) float32, grad (N, V) in hidden's dtype: token_weights[:, None] * d loss / d logits).
    """
    if not 0.0 < softcap <= FUSED_MAX_SOFTCAP:
        raise ValueError(f"softcap must be in (0, {FUSED_MAX_SOFTCAP}] for the fused kernel, got {softcap}")
    logits = hidden @ weight.t()
    losses = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    _softcap_cross_entropy_rows[(logits.size(0),)](
        logits, targets.contiguous(), token_weights.contiguous(), losses, logits.size(1), logits.stride(0),
        float(softcap), IGNORE=IGNORE_INDEX, LOG2_E=_LOG2_E, BLOCK=_BLOCK, num_warps=_WARPS)
    return losses, logits


@softcap_head_loss.register_fake
def _(hidden, weight, targets, token_weights, softcap):
    rows, vocab = hidden.size(0), weight.size(0)
    return hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, vocab)
