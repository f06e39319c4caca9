"""Static-shape decoding for `nanochat.gpt.GPT`: one token per row per step, replayable as a CUDA graph.

Batch-1 decoding with the dynamic KV cache is bound by kernel launches, not by the GPU: every step
launches several hundred small kernels from Python. `StaticDecoder` computes the same step with shapes
that never change, so the whole step can be captured once as a CUDA graph and replayed per token:

- keys and values live in a preallocated cache (layers, batch, kv_heads, max_len, head_dim); the step
  writes the new token's K/V at `pos` with `index_copy_`, where `pos` is a one-element device tensor;
- attention covers all `max_len` cached positions under an additive mask built on the device from `pos`
  (keys after `pos`, and for sliding-window layers keys more than `window` back, get -inf); the grouped
  queries of one KV head are folded into SDPA's query axis, so GQA needs no copy of the keys;
- the rotary angles of `pos` are gathered from the model's tables with `index_select`.

The step reads the model's parameters at every call (no copies), so in-place weight updates such as an
optimizer step are seen by a captured graph; replacing a parameter tensor is not (`is_stale()` tells).
It follows `GPT.forward` op for op in the same dtypes as the Engine's CUDA autocast path (norms and
rotary in float32, matrix products and the residual stream in `dtype`), except attention: a masked SDPA
over the whole cache instead of an unmasked one over the filled part, which rounds differently in bf16.

Use: `decoder = StaticDecoder(model, batch_size, max_len)`, optionally `decoder.capture()` (CUDA only),
`decoder.load_prefix(prompt_cache)` with a filled `KVCache`, then `logits = decoder.step(ids, position)`
per token. The returned logits tensor is reused by the next step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.gpt import GPT
from nanochat.kv_cache import KVCache

# GPT.forward's norms run in float32 (autocast upcasts rms_norm), where F.rms_norm's default eps is this one;
# passing it explicitly keeps the same eps when the input here is bf16.
RMS_EPS = torch.finfo(torch.float32).eps
# Cache lengths are rounded up to a multiple of this, so one capture serves prompts of similar lengths.
LENGTH_BUCKET = 256
# Eager steps on a side stream before capture (cuBLAS and SDPA pick and allocate their workspaces there).
WARMUP_STEPS = 2


def cache_length_bucket(tokens: int) -> int:
    """The static cache length used for `tokens` positions: rounded up to a multiple of LENGTH_BUCKET."""
    if tokens < 1:
        raise ValueError(f"a decode cache needs at least one position, got {tokens}")
    return -(-tokens // LENGTH_BUCKET) * LENGTH_BUCKET


def as_gpt(model: torch.nn.Module) -> GPT | None:
    """The `GPT` behind model (unwrapping torch.compile), or None when model is something else."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, GPT) else None


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


class StaticDecoder:
    """One decode step of `batch_size` rows over a static cache of `max_len` positions (see module docstring).

    `dtype` is the dtype of the cache, the matrix products and the residual stream: bfloat16 mirrors the
    Engine on CUDA, the parameters' dtype mirrors it elsewhere (the default). `compile_step` runs the step
    through `torch.compile` first (fewer, fused kernels; rounds differently from the eager model).
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 compile_step: bool = False):
        if not isinstance(model, GPT):
            raise TypeError(f"StaticDecoder needs a nanochat.gpt.GPT, got {type(model).__name__}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        config = model.config
        device = model.lm_head.weight.device
        self.model = model
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = dtype or model.lm_head.weight.dtype
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=device, dtype=self.dtype)
        self.ids = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.pos = torch.zeros(1, device=device, dtype=torch.long)
        self.key_positions = torch.arange(max_len, device=device)
        self._zero = torch.zeros((), device=device, dtype=self.dtype)
        self._minus_inf = torch.full((), float("-inf"), device=device, dtype=self.dtype)
        # A window that reaches back to position 0 from the last position masks nothing: treat it as full.
        self.layer_windows = [None if window is None or window >= max_len - 1 else window
                              for window in config.layer_windows()]
        self._distinct_windows = list(dict.fromkeys(self.layer_windows))
        self._step_fn = (torch.compile(self._forward, fullgraph=True, dynamic=False) if compile_step
                         else self._forward)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self._tensor_addresses = self._addresses()

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def _addresses(self) -> list[int]:
        return [t.data_ptr() for t in (*self.model.parameters(), self.model.cos, self.model.sin)]

    def is_stale(self) -> bool:
        """True when a model parameter or rotary table was replaced since construction (not updated in place)."""
        return self._addresses() != self._tensor_addresses

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if weight.dtype == self.dtype else weight.to(self.dtype)

    def _masks(self) -> dict[int | None, torch.Tensor]:
        """Additive attention masks (1, 1, 1, max_len) for the query at `pos`, one per distinct window."""
        distance = self.pos - self.key_positions
        causal = distance >= 0
        masks = {}
        for window in self._distinct_windows:
            visible = causal if window is None else causal & (distance <= window)
            masks[window] = torch.where(visible, self._zero, self._minus_inf).view(1, 1, 1, -1)
        return masks

    def _forward(self) -> torch.Tensor:
        """Logits (batch, vocab) of the tokens in `ids` at position `pos`; their K/V go into the cache."""
        model, config = self.model, self.model.config
        batch, heads, kv_heads, head_dim = self.batch_size, config.n_head, config.n_kv_head, config.head_dim
        group = heads // kv_heads
        # apply_rotary as one product for q and k together: x * [cos, cos] + roll(x) * [sin, -sin]
        cos = model.cos.index_select(0, self.pos)
        sin = model.sin.index_select(0, self.pos)
        cos_full = torch.cat([cos, cos], dim=-1)
        sin_full = torch.cat([sin, -sin], dim=-1)
        masks = self._masks()
        x = _norm(F.embedding(self.ids, model.transformer.wte.weight)).to(self.dtype)
        x0 = x
        for i, block in enumerate(model.transformer.h):
            attn, mlp = block.attn, block.mlp
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
            h = _norm(x)
            q = F.linear(h, self._weight(attn.c_q.weight))
            k = F.linear(h, self._weight(attn.c_k.weight))
            v = F.linear(h, self._weight(attn.c_v.weight))
            qk = _norm(torch.cat([q, k], dim=1).view(batch, heads + kv_heads, head_dim).float())
            qk = (qk * cos_full + qk.roll(head_dim // 2, dims=-1) * sin_full).to(self.dtype)
            self.k[i].index_copy_(2, self.pos, qk[:, heads:].unsqueeze(2))
            self.v[i].index_copy_(2, self.pos, v.view(batch, kv_heads, 1, head_dim))
            queries = qk[:, :heads].view(batch, kv_heads, group, head_dim)
            y = F.scaled_dot_product_attention(queries, self.k[i], self.v[i], attn_mask=masks[self.layer_windows[i]])
            x = x + F.linear(y.reshape(batch, heads * head_dim), self._weight(attn.c_proj.weight))
            hidden = F.relu(F.linear(_norm(x), self._weight(mlp.c_fc.weight))).square()
            x = x + F.linear(hidden, self._weight(mlp.c_proj.weight))
        logits = F.linear(_norm(x), self._weight(model.lm_head.weight)).float()
        cap = config.logit_softcap
        return cap * torch.tanh(logits / cap)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record the step as a CUDA graph; later `step` calls replay it. Raises on a non-CUDA model.

        The warm-up steps write the last cache position, which no step reads before writing it itself.
        """
        if not self.k.is_cuda:
            raise RuntimeError("CUDA graph capture needs the model on a CUDA device")
        self.pos.fill_(self.max_len - 1)
        side = torch.cuda.Stream(device=self.k.device)
        side.wait_stream(torch.cuda.current_stream(self.k.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step_fn()
        torch.cuda.current_stream(self.k.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step_fn()
        self._graph, self._graph_logits = graph, logits

    @torch.inference_mode()
    def load_prefix(self, cache: KVCache) -> int:
        """Copy a filled cache (batch 1 or `batch_size`) into positions 0..cache.pos; returns cache.pos."""
        config = self.model.config
        if (cache.num_layers, cache.num_heads, cache.head_dim) != (config.n_layer, config.n_kv_head, config.head_dim):
            raise ValueError("load_prefix needs a KVCache with the model's num_layers, n_kv_head and head_dim")
        if cache.batch_size not in (1, self.batch_size):
            raise ValueError(f"load_prefix copies a batch of 1 or {self.batch_size}, got {cache.batch_size}")
        if cache.pos > self.max_len:
            raise ValueError(f"the cache holds {cache.pos} positions, more than this decoder's {self.max_len}")
        self.k[:, :, :, :cache.pos].copy_(cache.k[:, :, :, :cache.pos])
        self.v[:, :, :, :cache.pos].copy_(cache.v[:, :, :, :cache.pos])
        return cache.pos

    @torch.inference_mode()
    def step(self, ids: torch.Tensor | list[int], position: int) -> torch.Tensor:
        """Float32 logits (batch, vocab) for `ids` (one token per row) at `position`; K/V stored there.

        Positions 0..position-1 must already be filled (by `load_prefix` or earlier steps).
        """
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} is outside this decoder's cache of {self.max_len} positions; "
                             "build the StaticDecoder with a larger max_len")
        if position >= self.model.rotary_len:
            raise ValueError(f"position {position} exceeds the rotary table ({self.model.rotary_len} positions)")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() != self.batch_size:
            raise ValueError(f"step takes one token per row ({self.batch_size}), got {ids.numel()}")
        self.ids.copy_(ids.reshape(-1))
        self.pos.fill_(position)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        return self._step_fn()
