"""The output head plus cross-entropy loss, two ways: PyTorch native or Liger's fused kernel.

`native`: logits = hidden @ W^T in the autocast dtype, softcapped with tanh in float32, cross-entropy.
When gradients are wanted from a 'mean' or 'sum' loss (training), the gradient with respect to the logits
is computed in the forward pass, together with the loss (`_HeadLossWithEarlyGradient`), and backward is
two matrix products scaled by the incoming gradient. On CUDA (with triton, which torch's CUDA builds
bring) that forward step is one Triton kernel that overwrites the logits with their gradient
(`nanochat.softcap_loss_triton`: two reads and one write of the logits, against about twice that for
autograd's softcap and cross-entropy); elsewhere it is PyTorch ops, which keep the logits and their
gradient side by side. Per-token losses ('none', used by RL) and evaluation without gradients take the
plain autograd path (`F.cross_entropy`).

`liger`: Liger-Kernel's fused linear cross-entropy computes the same loss chunk by chunk and its gradients
in the forward pass, so the full logits never exist. It honours the softcap and ignore_index. It calls
`.item()` internally (to count the non-ignored targets), so under `torch.compile` it needs
`torch._dynamo.config.capture_scalar_outputs = True` to avoid a graph break; `use_kernel("liger")` sets it.

Liger is an optional dependency (`pip install -e ".[gpu]"`) and runs on CUDA only; asking for it without
it installed raises `UsageError` naming the fix.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanochat.configargs import UsageError

KERNELS = ("native", "liger")
IGNORE_INDEX = -1
# The fused CUDA loss sums exp(capped - cap) >= exp(-2 cap), which must stay a normal float32 (> 1.2e-38).
FUSED_MAX_SOFTCAP = 40.0
# Looked up once here: torch.compile cannot trace importlib inside the loss.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_kernel(kernel: str) -> str:
    """Validate a `--kernel` choice and prepare for it; returns the kernel name.

    Raises UsageError for an unknown name or for liger when liger-kernel is not installed.
    """
    if kernel not in KERNELS:
        raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "liger":
        if not liger_installed():
            raise UsageError("--kernel liger needs liger-kernel: pip install -e \".[gpu]\" (or use --kernel native)")
        torch._dynamo.config.capture_scalar_outputs = True
    return kernel


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _fused_kernel_applies(hidden: torch.Tensor, softcap: float) -> bool:
    return hidden.is_cuda and _TRITON_INSTALLED and softcap <= FUSED_MAX_SOFTCAP


def _torch_loss_and_logit_gradient(hidden, weight, targets, token_weights, softcap):
    """Per-token losses and token_weights * d loss / d logits, in PyTorch ops (CPU, or where triton is not)."""
    squashed = torch.tanh((hidden @ weight.t()).float() / softcap)
    capped = softcap * squashed
    log_norm = torch.logsumexp(capped, dim=-1, keepdim=True)
    counted = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0).unsqueeze(1)
    token_losses = torch.where(counted, (log_norm - capped.gather(1, safe_targets)).squeeze(1), 0.0)
    is_target = torch.arange(capped.size(1), device=capped.device) == safe_targets
    grad_logits = (torch.exp(capped - log_norm) - is_target.float()) * (1.0 - squashed * squashed)
    return token_losses, (grad_logits * token_weights.unsqueeze(1)).to(hidden.dtype)


class _HeadLossWithEarlyGradient(torch.autograd.Function):
    """Softcapped cross-entropy of hidden @ weight^T ('mean' or 'sum') whose forward pass also computes
    d loss / d logits; backward multiplies that by the incoming gradient after the two matrix products.
    On CUDA the forward is one Triton kernel over the logits (`nanochat.softcap_loss_triton`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, reduction):
        device_type = hidden.device.type
        dtype = _compute_dtype(hidden)
        flat_hidden = hidden.reshape(-1, hidden.size(-1)).to(dtype)
        weight_cast = weight.to(dtype)
        flat_targets = targets.reshape(-1)
        counted = flat_targets != IGNORE_INDEX
        token_weights = counted.float()
        if reduction == "mean":
            token_weights = token_weights / counted.sum()
        casts_off = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()
        with casts_off:
            if _fused_kernel_applies(hidden, softcap):
                from nanochat.softcap_loss_triton import softcap_head_loss

                token_losses, grad_logits = softcap_head_loss(flat_hidden, weight_cast, flat_targets,
                                                              token_weights, softcap)
            else:
                token_losses, grad_logits = _torch_loss_and_logit_gradient(flat_hidden, weight_cast,
                                                                           flat_targets, token_weights, softcap)
        ctx.save_for_backward(flat_hidden, weight_cast, grad_logits)
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.weight_dtype = weight.dtype
        return (token_losses * token_weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        flat_hidden, weight_cast, grad_logits = ctx.saved_tensors
        hidden_shape, hidden_dtype = ctx.hidden_meta
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits @ weight_cast).float() * grad_loss).to(hidden_dtype).view(hidden_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = ((grad_logits.t() @ flat_hidden).float() * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _native_loss(hidden, weight, targets, softcap, reduction):
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if wants_grad and reduction in ("mean", "sum"):
        return _HeadLossWithEarlyGradient.apply(hidden, weight, targets, softcap, reduction)
    logits = F.linear(hidden, weight).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def _liger_loss(hidden, weight, targets, softcap, reduction):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    flat = hidden.reshape(-1, hidden.size(-1)).to(dtype)
    with torch.autocast("cuda", enabled=False):
        return liger_fused_linear_cross_entropy(flat, weight.to(dtype), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction=reduction, softcap=softcap)


_LIGER_LOSS = [_liger_loss]


def isolate_liger_from_compile(isolate: bool = True) -> None:
    """Run the liger kernel outside torch.compile graphs (one graph break at the loss) or, by default, inside.

    The fallback for a torch/liger pair whose fused kernel does not trace under fullgraph compilation.
    """
    _LIGER_LOSS[0] = torch.compiler.disable(_liger_loss) if isolate else _liger_loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                         reduction: str = "mean", kernel: str = "native") -> torch.Tensor:
    """Cross-entropy of softcap * tanh((hidden @ weight^T) / softcap) against targets (ignore_index -1).

    hidden (..., d), weight (vocab, d), targets (...). reduction 'mean' (over non-ignored targets), 'sum' or
    'none' (flat, one value per target, 0 where ignored). The liger kernel needs CUDA tensors.
    """
    if kernel == "native":
        return _native_loss(hidden, weight, targets, softcap, reduction)
    if kernel == "liger":
        return _LIGER_LOSS[0](hidden, weight, targets, softcap, reduction)
    raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
