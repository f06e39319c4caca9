"""Sliding-window attention through PyTorch's FlexAttention: the CUDA training fast path for 'S' layers.

SDPA with a dense boolean mask (the reference path in `nanochat.gpt.attention`) computes every query-key
pair and then throws most of them away; FlexAttention skips whole 128x128 tiles that the mask rules out,
so a window of a quarter of the context costs roughly a quarter of full attention. It ships with PyTorch
(`torch.nn.attention.flex_attention`): nothing is downloaded at run time.

Block masks are built once per (sequence length, window, device) and cached; `GPT.enable_flex_attention`
builds them eagerly before the model is compiled, so the compiled graph only reads them. Outside a
`torch.compile` region `flex_attention` is called through its own compiled wrapper (eager FlexAttention is
a slow reference implementation). Full-window layers keep SDPA's `is_causal` flash path.
"""

from __future__ import annotations

import torch

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
