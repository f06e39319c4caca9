"""The output head plus cross-entropy loss, two ways: PyTorch native or Liger's fused kernel.

`native`: logits = hidden @ W^T in the autocast dtype, cast to float32, softcapped with tanh, then
`F.cross_entropy`. It materialises the (B*T, vocab) logits (8.6 GB in float32 at batch 32 x 2048 tokens x
32768 vocab) plus what autograd keeps for the backward pass.

`liger`: Liger-Kernel's fused linear cross-entropy computes the same loss chunk by chunk and its gradients
in the forward pass, so the full logits never exist. It honours the softcap and ignore_index. It calls
`.item()` internally (to count the non-ignored targets), so under `torch.compile` it needs
`torch._dynamo.config.capture_scalar_outputs = True` to avoid a graph break; `use_kernel("liger")` sets it.

Liger is an optional dependency (`pip install -e ".[gpu]"`) and runs on CUDA only; asking for it without
it installed raises `UsageError` naming the fix.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from nanochat.configargs import UsageError

KERNELS = ("native", "liger")
IGNORE_INDEX = -1


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


def _native_loss(hidden, weight, targets, softcap, reduction):
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
