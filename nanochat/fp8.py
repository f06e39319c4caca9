"""FP8 training for the transformer blocks' matmuls: `torch._scaled_mm` with dynamic tensorwise scales.

Each converted linear layer runs forward as out = x @ W^T with x and W cast to float8 e4m3, each scaled
by its own current amax (one scale per tensor, recomputed every call: no amax history to keep or resume).
The backward pass casts the output gradient to float8 e5m2 (more range, less precision, as gradients
need) and computes dX = dY @ W and dW = dY^T @ X with the saved float8 copies of W and X. The master
weights stay float32 and the optimizer never sees float8.

Only the linear layers inside the blocks are converted; the embedding, lm_head and everything outside the
matmuls stay in bf16 autocast. In eval mode (or under `torch.no_grad`) a converted layer is a plain bf16
linear, so evaluation runs in bf16. FP8 tensor cores exist on Hopper (sm_90) and Blackwell (sm_100+);
`check_fp8_support` refuses anything else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.configargs import UsageError

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# _scaled_mm needs every matrix dimension to be a multiple of 16.
SCALED_MM_ALIGNMENT = 16
MIN_CAPABILITY = (9, 0)


def check_fp8_support(device_name: str, capability: tuple[int, int]) -> None:
    """Raise UsageError unless the GPU has FP8 tensor cores this module uses (Hopper or Blackwell)."""
    if tuple(capability) < MIN_CAPABILITY:
        raise UsageError(f"--precision fp8 needs a Hopper or Blackwell GPU (compute capability 9.0+); "
                         f"{device_name} is {capability[0]}.{capability[1]}: use --precision bf16")


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise cast: (x * scale) in `dtype` and the float32 inverse scale that undoes it.

    scale = max representable / amax(x), so the largest element lands on the format's largest value.
    """
    limit = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = limit / amax
    scaled = (x.float() * scale).clamp(-limit, limit).to(dtype)
    return scaled, scale.reciprocal()


def _column_major(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """out = x @ w^T for 2-D x (N, in) and w (out, in), float8 in both passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = to_float8(x, E4M3)
        w8, w_inv = to_float8(weight, E4M3)
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(grad_out, E5M2)
        grad_x = torch._scaled_mm(g8, _column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_out.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), _column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x.to(ctx.input_dtype), grad_w, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with float8 matmuls; x (..., in), any leading shape."""
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        out_dtype = torch.bfloat16
    flat = x.reshape(-1, x.size(-1))
    if flat.size(0) % SCALED_MM_ALIGNMENT != 0:
        raise ValueError(f"float8 training needs batch x tokens to be a multiple of {SCALED_MM_ALIGNMENT}, "
                         f"got {flat.size(0)} rows")
    with torch.autocast(x.device.type, enabled=False):
        out = _Float8Matmul.apply(flat, weight, out_dtype)
    return out.view(*x.shape[:-1], weight.size(0))


class Float8Linear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose training forward runs in float8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return float8_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def fp8_eligible(linear: nn.Linear) -> bool:
    out_features, in_features = linear.weight.shape
    return (linear.bias is None and out_features % SCALED_MM_ALIGNMENT == 0
            and in_features % SCALED_MM_ALIGNMENT == 0)


def convert_blocks_to_fp8(blocks: nn.Module) -> int:
    """Turn every eligible nn.Linear under `blocks` into a Float8Linear in place; returns how many.

    The class is swapped on the existing module, so parameters, optimizer references and checkpoints are
    untouched.
    """
    converted = 0
    for module in blocks.modules():
        if type(module) is nn.Linear and fp8_eligible(module):
            module.__class__ = Float8Linear
            converted += 1
    return converted


def count_fp8_layers(model: nn.Module) -> int:
    return sum(1 for module in model.modules() if isinstance(module, Float8Linear))
