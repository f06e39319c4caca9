"""The GPT model: a small modern decoder-only transformer in the nanochat style.

- token embedding untied from the output head; no positional embedding, rotary embeddings instead
- RMSNorm without learnable parameters after the embedding, before every sublayer and before the head
- attention with QK-norm, grouped-query attention (n_kv_head < n_head), causal masking and per-layer
  sliding windows ('S' layers see `short_window` previous tokens, 'L' layers see everything)
- relu² MLP of width 4 * n_embd; no biases anywhere
- per-layer learnable scalars: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0, where x0 is the
  normed embedding (starts as the plain residual stream: lambdas 1 and 0)
- logits softcapped with tanh and computed in float32

All attention goes through `attention()`, the one place a faster kernel can be swapped in: on CUDA,
`GPT.set_window_kernel("cudnn" | "flex")` gives the sliding-window layers a kernel that skips the tiles
outside the window (`nanochat.attention_kernels`), and `attention()` uses it for self-attention it
accepts; SDPA stays the reference and the path for everything else. The output head and loss go through
`nanochat.kernels.linear_cross_entropy` (`GPT.loss_kernel`: "native" or Liger's fused "liger").
Meta-device construction: build under `torch.device("meta")`, then `model.to_empty(device=...)` and
`model.init_weights()` (which also fills the rotary tables, buffers that are not saved in the state dict);
to load a checkpoint, call `init_weights()` first and `load_state_dict()` after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention_kernels import resolve_window_kernel, window_kernel
from nanochat.kernels import linear_cross_entropy, use_kernel
from nanochat.kv_cache import KVCache
from nanochat.optim import MuonAdamW

# Rotary tables cover sequence_len * ROTARY_HEADROOM positions so generation can run well past the training
# context; they cost 2 * positions * head_dim / 2 floats, a few MB at sequence_len 2048.
ROTARY_HEADROOM = 10
ROTARY_BASE = 10000.0
# AdamW learning rates were tuned (by nanochat) at model width 768; they shrink like 1/sqrt(width) beyond it.
ADAMW_REFERENCE_DIM = 768
# Std of the lm_head init: small, so the first logits are near uniform without being exactly zero.
LM_HEAD_INIT_STD = 0.001


@dataclass
class GPTConfig:
    """Model shape. `window_pattern` is tiled across layers; the last layer is always full ('L').

    `short_window`: how many previous tokens an 'S' layer attends to, besides the token itself (query i sees
    keys j with i - short_window <= j <= i, the flash-attention `window_size=(short_window, 0)` convention).
    None means sequence_len // 4, the quarter-context window nanochat uses; it is resolved here, so a saved
    config always carries the number.
    """

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"
    short_window: int | None = None
    logit_softcap: float = 15.0

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for rotary "
                             "embeddings")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern must be a non-empty string of 'S' and 'L', got {self.window_pattern!r}")
        if self.short_window is None:
            self.short_window = max(1, self.sequence_len // 4)
        if not isinstance(self.short_window, int) or self.short_window <= 0:
            raise ValueError(f"short_window must be a positive integer, got {self.short_window!r}")
        if self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive, got {self.logit_softcap}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_windows(self) -> list[int | None]:
        """Per layer: the sliding window in previous tokens, or None for full causal attention."""
        pattern = (self.window_pattern * self.n_layer)[: self.n_layer]
        pattern = pattern[:-1] + "L"
        return [None if kind == "L" else self.short_window for kind in pattern]

    def windowed_layers(self) -> int:
        """How many layers see fewer than all previous tokens at the training length (the ones a sliding-window
        kernel speeds up)."""
        return sum(window is not None and window < self.sequence_len - 1 for window in self.layer_windows())


def attention_flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token of the attention scores and the value mix (QK^T and AV, forward + backward).

    Each is 2 * n_head * head_dim * keys FLOPs forward, times 3 for forward + backward; keys is the number of
    positions a query can see at full context: sequence_len for 'L' layers, min(short_window + 1,
    sequence_len) for 'S' layers. Like the usual 6N estimate it ignores the causal halving.
    """
    total = 0
    for window in config.layer_windows():
        keys = config.sequence_len if window is None else min(window + 1, config.sequence_len)
        total += 12 * config.n_head * config.head_dim * keys
    return total


def adamw_lr_scale(n_embd: int) -> float:
    """Factor applied to the embedding and unembedding AdamW learning rates: (n_embd / 768) ** -0.5."""
    return (n_embd / ADAMW_REFERENCE_DIM) ** -0.5


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension with no learnable parameters."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(positions: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (positions, head_dim / 2), float32."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the angles of its positions; cos/sin are (T, D/2), or (B, T, D/2) when the
    rows sit at different positions."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention_mask(num_queries: int, num_keys: int, window: int | None, device,
                   query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (num_queries, num_keys) mask, True = attend. The queries are the last num_queries keys, or,
    given their positions per row (B, num_queries), anywhere: the mask is then (B, 1, num_queries, num_keys)."""
    if query_positions is None:
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    else:
        query_pos = query_positions[:, None, :, None]
    key_pos = torch.arange(num_keys, device=device)
    distance = query_pos - key_pos
    mask = distance >= 0
    if window is not None:
        mask &= distance <= window
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
              kernel=None, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention; q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D).

    The queries are the last Tq of the Tk key positions (Tq == Tk in training, Tq < Tk with a KV cache),
    or, for rows at different positions, at `query_positions` (B, Tq) (keys are at positions 0..Tk-1).
    Hq may be a multiple of Hkv (grouped-query attention). `kernel`: a sliding-window kernel for this
    window (`nanochat.attention_kernels.window_kernel`), used when it accepts these tensors.
    """
    num_queries, num_keys = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if query_positions is not None:
        mask = attention_mask(num_queries, num_keys, window, q.device, query_positions)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if kernel is not None and kernel.accepts(q, k):
        return kernel(q, k, v)
    sees_all_keys = window is None or window >= num_keys - 1
    if sees_all_keys and num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if sees_all_keys and num_queries == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = attention_mask(num_queries, num_keys, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.window_kernel = None  # a faster kernel for this layer's window, set by GPT.set_window_kernel

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None):
        batch, tokens, _ = x.shape
        q = self.c_q(x).view(batch, tokens, self.n_head, self.head_dim)
        k = self.c_k(x).view(batch, tokens, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(batch, tokens, self.n_kv_head, self.head_dim)
        # Norm and rotate token-major, then view as (B, H, T, D): q, k and v stay token-major in memory, so the
        # attention output (laid out like q) reshapes back to (B, T, C) without a copy, and its gradient
        # arrives in the output's own layout (cuDNN's backward copies a gradient laid out otherwise).
        q = apply_rotary(norm(q), cos, sin).transpose(1, 2)
        k = apply_rotary(norm(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is None:
            y = attention(q, k, v, self.window, self.window_kernel)
        else:
            positions = kv_cache.query_positions(tokens)
            k, v = kv_cache.insert(self.layer_idx, k, v)
            y = attention(q, k, v, self.window, query_positions=positions)
        return self.c_proj(y.transpose(1, 2).reshape(batch, tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, x0, resid_lambda, x0_lambda, cos, sin, kv_cache):
        x = resid_lambda * x + x0_lambda * x0
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        windows = config.layer_windows()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, windows[i]) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_kernel = "native"
        self._compiled_head_loss = None  # set by compile_regions
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.rotary_len = config.sequence_len * ROTARY_HEADROOM
        cos, sin = rotary_tables(self.rotary_len, config.head_dim, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and the rotary tables in a fixed order (deterministic given the seed).

        Embedding N(0, 1) (it is normed right away, so only its direction matters); matrices reading the
        residual stream N(0, 1/n_embd) so their outputs start at unit scale; the output projections of
        attention and MLP zero, so every block starts as the identity; lm_head N(0, 0.001^2).
        """
        config = self.config
        device = self.lm_head.weight.device
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        std = config.n_embd ** -0.5
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=LM_HEAD_INIT_STD)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.0)
        cos, sin = rotary_tables(self.rotary_len, config.head_dim, device=device)
        self.cos, self.sin = cos, sin

    def set_window_kernel(self, name: str) -> int:
        """Give every sliding-window layer the named kernel: "cudnn", "flex" or "sdpa" (none: the reference).

        Pick the name with `nanochat.attention_kernels.resolve_window_kernel`. FlexAttention block masks are
        built here, on the model's device and at the training length, so call it before torch.compile.
        Returns how many layers now use a kernel. Full-window layers always keep SDPA's causal path.
        """
        device, length = self.lm_head.weight.device, self.config.sequence_len
        for block in self.transformer.h:
            attn = block.attn
            windowed = attn.window is not None and attn.window < length - 1
            attn.window_kernel = window_kernel(name, length, attn.window, device) if windowed else None
        return sum(block.attn.window_kernel is not None for block in self.transformer.h)

    def choose_window_kernel(self, requested: str) -> str | None:
        """Resolve an `--attention` choice ("auto", "cudnn", "flex", "sdpa") for this model on its device and
        install it (`set_window_kernel`). Returns the line to log, or None for a model without sliding-window
        layers (nothing is resolved then). Raises UsageError for a kernel that cannot run here."""
        if not self.config.windowed_layers():
            return None
        name = resolve_window_kernel(requested, self.lm_head.weight.device, self.config.head_dim)
        self.set_window_kernel(name)
        return f"attention kernel of the {self.config.windowed_layers()} sliding-window layers: {name}"

    def set_loss_kernel(self, kernel: str) -> None:
        """'native' (full logits in the autocast dtype, see `nanochat.kernels`) or 'liger' (fused linear
        cross-entropy; UsageError if absent)."""
        self.loss_kernel = use_kernel(kernel)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by kind: embedding, lm_head, matrices (inside blocks), scalars, total."""
        counts = {
            "embedding": self.transformer.wte.weight.numel(),
            "lm_head": self.lm_head.weight.numel(),
            "matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 x (block matrices + lm_head) plus attention scores and value mixing."""
        counts = self.param_counts()
        return float(6 * (counts["matrices"] + counts["lm_head"]) + attention_flops_per_token(self.config))

    def setup_optimizer(self, unembedding_lr: float, embedding_lr: float, matrix_lr: float, scalar_lr: float,
                        weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95)) -> MuonAdamW:
        """Muon for the 2-D matrices inside blocks (one group per shape), AdamW for wte, lm_head, scalars.

        The embedding and unembedding AdamW learning rates are multiplied by (n_embd / 768) ** -0.5
        (`adamw_lr_scale`), as nanochat does; the scalar learning rate is used as given. Weight decay is
        decoupled and applies to the Muon matrices only.
        """
        lr_scale = adamw_lr_scale(self.config.n_embd)
        matrices_by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for param in self.transformer.h.parameters():
            matrices_by_shape.setdefault(tuple(param.shape), []).append(param)
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * lr_scale, **adamw),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * lr_scale, **adamw),
            dict(params=[self.resid_lambdas, self.x0_lambdas], lr=scalar_lr, **adamw),
        ]
        for shape in sorted(matrices_by_shape):
            groups.append(dict(params=matrices_by_shape[shape], kind="muon", lr=matrix_lr,
                               weight_decay=weight_decay))
        return MuonAdamW(groups)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T), the cross-entropy loss (ignore_index=-1; reduction
        "mean", "sum" or "none", the last shaped (B, T)); without, float32 logits (B, T, vocab_size).
        With a kv_cache, idx are the tokens at positions kv_cache.pos.. (or at each row's own position, see
        `KVCache.prefill_rows`) and their K/V are appended."""
        _, tokens = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + tokens > self.rotary_len:
            raise ValueError(f"position {start + tokens} exceeds the rotary table ({self.rotary_len} positions)")
        positions = kv_cache.query_positions(tokens) if kv_cache is not None else None
        if positions is None:
            cos, sin = self.cos[start:start + tokens], self.sin[start:start + tokens]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        x = norm(self.transformer.wte(idx))
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # a bf16 residual stream: the norms and residual adds save half the activations and bytes
            x = x.to(torch.get_autocast_dtype("cuda"))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], cos, sin, kv_cache)
        cap = self.config.logit_softcap
        if targets is None:
            logits = self.lm_head(norm(x)).float()
            return cap * torch.tanh(logits / cap)
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        head_loss = self._compiled_head_loss or self._head_loss
        loss = head_loss(x, targets, loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor, loss_reduction: str) -> torch.Tensor:
        return linear_cross_entropy(norm(x), self.lm_head.weight, targets, self.config.logit_softcap,
                                    loss_reduction, self.loss_kernel)

    def compile_regions(self, dynamic: bool = False) -> None:
        """Compile each block and the head-and-loss on their own instead of the whole model (regional
        compilation; call instead of `torch.compile(model)`).

        The blocks share one compiled graph per window kind. What it buys: the backward pass is one compiled
        function per block, so each block's gradients are final as soon as its backward ends, and
        `MuonAdamW.overlap_reductions` can send them across GPUs while earlier blocks still compute.
        """
        for block in self.transformer.h:
            block.compile(dynamic=dynamic)
        self._compiled_head_loss = torch.compile(self._head_loss, dynamic=dynamic)

    def backward_order(self) -> list[nn.Parameter]:
        """The parameters in the order backward finishes their gradients: head, last block .. first block,
        embedding, then the per-layer scalars (every block adds to their gradients)."""
        order = [self.lm_head.weight]
        for block in reversed(self.transformer.h):
            order.extend(block.parameters())
        order += [self.transformer.wte.weight, self.resid_lambdas, self.x0_lambdas]
        return order
