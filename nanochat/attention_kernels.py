"""Sliding-window attention kernels for the CUDA training path of 'S' layers, chosen by name.

SDPA with a dense boolean mask (the reference path in `nanochat.gpt.attention`) computes every query-key
pair and then throws most of them away. Two kernels skip the tiles a window rules out:

- "cudnn": cuDNN's fused attention with a diagonal band, through the `torch.ops.cudnn.sdpa_fwd` custom op of
  NVIDIA's cudnn-frontend package (the `[gpu]` extra, from the package registry; it uses the cuDNN library
  that PyTorch already ships). Any sequence length, bf16/fp16, forward and backward, traceable by
  torch.compile. The fastest of the three on an H100 (docs/benchmarks.md).
- "flex": PyTorch's own FlexAttention (`torch.nn.attention.flex_attention`) with a block mask built once per
  (sequence length, window, device); nothing to install. Only at the mask's length.
- "sdpa": no kernel; every window goes through the dense-mask reference.

`resolve_window_kernel("auto", ...)` takes cudnn when the package is there and a small probe on this GPU
gives the reference's answer, else FlexAttention, and says so on stderr; `window_kernel(name, ...)` makes a
layer's kernel object, which `nanochat.gpt.attention` calls for full-length self-attention only. Nothing
here imports cudnn-frontend or touches a GPU until `resolve_window_kernel` is called.

Outside a `torch.compile` region `flex_attention` is called through its own compiled wrapper (eager
FlexAttention is a slow reference implementation).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nanochat.configargs import UsageError

WINDOW_KERNELS = ("auto", "cudnn", "flex", "sdpa")
ATTENTION_FLAG_HELP = ("sliding-window layers: cudnn (cudnn-frontend, the [gpu] extra), flex (FlexAttention, rows "
                       "of the model's full length only), sdpa (dense mask); auto: cudnn if it works here, else "
                       "flex (CUDA) or sdpa")
# The probe that checks the cuDNN kernel against the dense-mask reference before it is trusted.
_PROBE_LENGTH, _PROBE_WINDOW, _PROBE_TOLERANCE = 256, 37, 2e-2

_BLOCK_MASKS: dict[tuple[int, int, str], object] = {}
_COMPILED_FLEX: list = []


def flex_attention_available() -> bool:
    """True when this PyTorch ships FlexAttention (2.5 and later)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sliding_window_mask_mod(window: int):
    """The mask rule as FlexAttention wants it: query i sees key j when 0 <= i - j <= window.

    Same convention as `nanochat.gpt.attention_mask` (window = previous tokens seen besides the token itself).
    """

    def mask_mod(batch, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance <= window)

    return mask_mod


def sliding_window_block_mask(seq_len: int, window: int, device: torch.device | str):
    """The cached BlockMask for self-attention over `seq_len` tokens with a sliding `window`."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (seq_len, window, str(torch.device(device)))
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = create_block_mask(sliding_window_mask_mod(window), None, None, seq_len, seq_len,
                                              device=str(torch.device(device)))
    return _BLOCK_MASKS[key]


def flex_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D) under `block_mask` (grouped-query aware)."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.size(1) != k.size(1)
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](q, k, v, block_mask=block_mask, enable_gqa=gqa)


def cudnn_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D), query i seeing keys i - window .. i.

    cuDNN counts its band's left bound in visible tokens including the query's own (FlashAttention's
    `window_size=(w, 0)` is cuDNN's `w + 1`). Needs `import cudnn.sdpa.fwd.torch_op` first
    (`resolve_window_kernel` does it); the log-sum-exp output is what its backward reads.
    """
    out, _ = torch.ops.cudnn.sdpa_fwd(q, k, v, q.size(-1) ** -0.5, is_causal=True, window_left=window + 1,
                                      return_lse=True)
    return out


class FlexWindow:
    """FlexAttention under one cached block mask: self-attention at exactly the mask's length."""

    name = "flex"

    def __init__(self, seq_len: int, window: int, device: torch.device | str):
        self.seq_len = seq_len
        self.block_mask = sliding_window_block_mask(seq_len, window, device)

    def accepts(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        return q.size(2) == k.size(2) == self.seq_len

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex_sliding_window_attention(q, k, v, self.block_mask)


class CudnnWindow:
    """cuDNN's banded attention: self-attention of any length on CUDA in bf16 or fp16."""

    name = "cudnn"

    def __init__(self, window: int):
        self.window = window

    def accepts(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.size(2) == k.size(2)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cudnn_sliding_window_attention(q, k, v, self.window)


def window_kernel(name: str, seq_len: int, window: int, device: torch.device | str):
    """The kernel object for one layer ("cudnn" or "flex"), or None for "sdpa" (the dense-mask reference)."""
    if name == "cudnn":
        return CudnnWindow(window)
    if name == "flex":
        return FlexWindow(seq_len, window, device)
    if name == "sdpa":
        return None
    raise UsageError(f"--attention must be one of cudnn, flex, sdpa here, got {name!r}")


def cudnn_window_problem(device: torch.device | str, head_dim: int) -> str | None:
    """Why the cuDNN window kernel cannot be used on `device` (None: it can).

    Imports cudnn-frontend's op, then runs a small windowed forward and backward and compares them with the
    dense-mask reference, so a GPU, cuDNN build or package version that disagrees is refused before training.
    """
    try:
        import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd)
    except Exception as exc:  # ImportError, or a cuDNN library it cannot load
        return f"cudnn-frontend is not usable ({type(exc).__name__}: {exc}); pip install -e '.[gpu]' installs it"
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (1, 2, _PROBE_LENGTH, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_(True)
               for _ in range(3))
    position = torch.arange(_PROBE_LENGTH, device=device)
    mask = sliding_window_mask_mod(_PROBE_WINDOW)(0, 0, position[:, None], position[None, :])
    try:
        out = cudnn_sliding_window_attention(q, k, v, _PROBE_WINDOW)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    except Exception as exc:  # an unsupported GPU or cuDNN version fails here, not mid-training
        return f"cuDNN windowed attention failed on this GPU ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    upcast = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*upcast, attn_mask=mask)
    reference_grads = torch.autograd.grad(reference, upcast, torch.ones_like(reference))
    for got, want in zip((out, *grads), (reference, *reference_grads)):
        error = ((got.float() - want).norm() / want.norm()).item()
        if not error < _PROBE_TOLERANCE:
            return f"cuDNN windowed attention disagrees with the reference on this GPU (relative error {error:.3g})"
    return None


def resolve_window_kernel(requested: str, device: torch.device | str, head_dim: int) -> str:
    """The window kernel to use: "cudnn", "flex" or "sdpa".

    "auto": cudnn on CUDA when `cudnn_window_problem` finds none, else flex (saying why on stderr), and the
    reference off CUDA. Asking for cudnn or flex where it cannot run is a UsageError naming the fix.
    """
    if requested not in WINDOW_KERNELS:
        raise UsageError(f"--attention must be one of {', '.join(WINDOW_KERNELS)}, got {requested!r}")
    cuda = torch.device(device).type == "cuda"
    if requested == "sdpa" or (requested == "auto" and not cuda):
        return "sdpa"
    if not cuda:
        raise UsageError(f"--attention {requested} needs a CUDA GPU; use --attention auto or sdpa")
    if requested in ("auto", "cudnn"):
        problem = cudnn_window_problem(device, head_dim)
        if problem is None:
            return "cudnn"
        if requested == "cudnn":
            raise UsageError(f"--attention cudnn: {problem}")
        print(f"WARNING: sliding-window layers use FlexAttention, not cuDNN (slower): {problem}",
              file=sys.stderr, flush=True)
    if flex_attention_available():
        return "flex"
    if requested == "flex":
        raise UsageError("--attention flex needs PyTorch 2.5 or later (FlexAttention); use --attention sdpa")
    print("WARNING: this PyTorch has no FlexAttention either: sliding-window layers use the dense-mask SDPA "
          "reference (slow)", file=sys.stderr, flush=True)
    return "sdpa"
