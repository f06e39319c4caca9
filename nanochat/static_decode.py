"""Static-shape decoding for `nanochat.gpt.GPT`: one token per row per step, replayable as a CUDA graph.

Batch-1 decoding with the dynamic KV cache is bound by kernel launches, not by the GPU: every step
launches several hundred small kernels from Python. `StaticDecoder` computes the same step with shapes
that never change, so the whole step can be captured once as a CUDA graph and replayed per token:

- keys and values live in one preallocated cache (layers, 2, batch, kv_heads, max_len, head_dim); the step
  writes each row's new K and V at that row's position with one `scatter_`, where `pos` is a (batch,)
  device tensor: the rows may sit at different positions (prompts of different lengths decoded together);
- attention covers all `max_len` cached positions under an additive mask built on the device from `pos`,
  per row (keys after the row's position, and for sliding-window layers keys more than `window` back, get
  -inf); the grouped queries of one KV head are folded into SDPA's query axis, so GQA needs no copy of the
  keys;
- each row's rotary angles are gathered from the model's tables with `index_select`;
- the query, key and value projections run as one matrix product over a fused copy of their weights
  (`qkv_weight`, refreshed whenever a projection weight changes in place: see `step`).

The step is cut into pure pieces around the cache write (embed, per-layer attention inputs, per-layer
block output, head); with `compile_step` each piece goes through `torch.compile` on its own, so inductor
fuses the norms, rotary and residual arithmetic into a few kernels per layer while the cache is written
in place outside any compiled region (compiling across the write would copy the whole cache every step).

The other parameters are read at every call (no copies), so in-place updates such as an optimizer step
are seen by a captured graph; replacing a parameter tensor is not (`is_stale()` tells). It follows
`GPT.forward` op for op in the same dtypes as the Engine's CUDA autocast path (norms and rotary in float32,
matrix products and the residual stream in `dtype`), except attention: a masked SDPA over the whole cache
instead of an unmasked one over the filled part, which rounds differently in bf16.

Use: `decoder = StaticDecoder(model, batch_size, max_len)`, optionally `decoder.capture()` (CUDA only),
`decoder.load_prefix(prompt_cache)` with a filled `KVCache` (or `load_prefix(cache, rows)` per prompt, to
decode several prompts together), then `logits = decoder.step(ids, position)` per token, with one position
for every row or a tensor of per-row positions. The returned logits tensor is reused by the next step.
"""

from __future__ import annotations

import contextlib
import threading

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
# Decoders compile their pieces during capture's warm-up; one at a time (the web server captures one
# decoder per GPU, each in its own thread).
_COMPILE_LOCK = threading.Lock()
# Every (rows, cache length) a process decodes with is one more compiled version of each piece: batched
# evaluation and rollouts see a dozen or more (each task's last, smaller batch; several length buckets),
# past dynamo's default limit of 8, where a fullgraph compile fails and the engine would fall back to the
# uncompiled graph for good. Capture raises the limit to this many shapes.
COMPILED_SHAPES_LIMIT = 64


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


def _embed(ids: torch.Tensor, wte: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _norm(F.embedding(ids, wte)).to(dtype)


def _rotary_rows(cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor):
    """cos and sin (batch, 1, head_dim) of each row's position, laid out for `_attention_inputs`:
    x * [cos, cos] + roll(x) * [sin, -sin]."""
    cos = cos_table.index_select(0, pos)
    sin = sin_table.index_select(0, pos)
    return torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, -sin], dim=-1).unsqueeze(1)


def _attention_masks(pos: torch.Tensor, key_positions: torch.Tensor, windows: tuple, zero: torch.Tensor,
                     minus_inf: torch.Tensor) -> list[torch.Tensor]:
    """Additive masks (batch, 1, 1, max_len) for each row's query at its position `pos`, one per entry of
    `windows` (None = full)."""
    distance = pos[:, None] - key_positions
    causal = distance >= 0
    masks = []
    for window in windows:
        visible = causal if window is None else causal & (distance <= window)
        masks.append(torch.where(visible, zero, minus_inf)[:, None, None, :])
    return masks


def _attention_inputs(x: torch.Tensor, x0: torch.Tensor, resid_lambda: torch.Tensor, x0_lambda: torch.Tensor,
                      qkv_weight: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor, heads: int,
                      kv_heads: int, head_dim: int):
    """The block's mixed input x, its queries (batch, kv_heads, group, head_dim) and the new token's K and V
    stacked as (2, batch, kv_heads, 1, head_dim)."""
    batch = x.size(0)
    x = resid_lambda * x + x0_lambda * x0
    qkv = F.linear(_norm(x), qkv_weight)
    split = (heads + kv_heads) * head_dim
    qk = _norm(qkv[:, :split].view(batch, heads + kv_heads, head_dim).float())
    qk = (qk * cos_full + qk.roll(head_dim // 2, dims=-1) * sin_full).to(x.dtype)
    queries = qk[:, :heads].view(batch, kv_heads, heads // kv_heads, head_dim)
    new_kv = torch.stack([qk[:, heads:], qkv[:, split:].view(batch, kv_heads, head_dim)]).unsqueeze(3)
    return x, queries, new_kv


def _block_output(x: torch.Tensor, y: torch.Tensor, attn_proj: torch.Tensor, mlp_fc: torch.Tensor,
                  mlp_proj: torch.Tensor) -> torch.Tensor:
    x = x + F.linear(y.reshape(x.size(0), -1), attn_proj)
    hidden = F.relu(F.linear(_norm(x), mlp_fc)).square()
    return x + F.linear(hidden, mlp_proj)


def _logits(x: torch.Tensor, lm_head: torch.Tensor, cap: float) -> torch.Tensor:
    logits = F.linear(_norm(x), lm_head).float()
    return cap * torch.tanh(logits / cap)


class StaticDecoder:
    """One decode step of `batch_size` rows over a static cache of `max_len` positions (see module docstring).

    `dtype` is the dtype of the cache, the matrix products and the residual stream: bfloat16 mirrors the
    Engine on CUDA, the parameters' dtype mirrors it elsewhere (the default). `compile_step` runs the step's
    pieces through `torch.compile` first (fewer, fused kernels; rounds differently from the eager model).
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
        self.kv = torch.zeros((config.n_layer, 2, batch_size, config.n_kv_head, max_len, config.head_dim),
                              device=device, dtype=self.dtype)
        qkv_rows = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv_weight = torch.empty((config.n_layer, qkv_rows, config.n_embd), device=device, dtype=self.dtype)
        self._projection_weights = [w for block in model.transformer.h
                                    for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight)]
        self._qkv_versions: tuple[int, ...] | None = None
        self.sync_weights()
        self.ids = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        # where each row's new K and V go: a view of `pos`, so it follows every update of it
        self._write_index = self.pos.view(1, batch_size, 1, 1, 1).expand(2, batch_size, config.n_kv_head, 1,
                                                                         config.head_dim)
        self.key_positions = torch.arange(max_len, device=device)
        self._zero = torch.zeros((), device=device, dtype=self.dtype)
        self._minus_inf = torch.full((), float("-inf"), device=device, dtype=self.dtype)
        # A window that reaches back to position 0 from the last position masks nothing: treat it as full.
        layer_windows = [None if window is None or window >= max_len - 1 else window
                         for window in config.layer_windows()]
        self._windows = tuple(dict.fromkeys(layer_windows))
        self._layer_mask = [self._windows.index(window) for window in layer_windows]
        self.compiled = compile_step
        pieces = (_embed, _rotary_rows, _attention_masks, _attention_inputs, _block_output, _logits)
        if compile_step:
            pieces = tuple(torch.compile(piece, fullgraph=True, dynamic=False) for piece in pieces)
        (self._embed, self._rotary_rows, self._attention_masks, self._attention_inputs, self._block_output,
         self._logits) = pieces
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

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the query, key and value weights into `qkv_weight` if any changed since the last copy.

        Tensor version counters tell: every in-place update (an optimizer step, `copy_`, `mul_`) bumps them.
        A replaced weight tensor is not followed (`is_stale()` says so).
        """
        weights = self._projection_weights
        versions = tuple(w._version for w in weights)
        if versions == self._qkv_versions:
            return
        for layer in range(self.model.config.n_layer):
            start = 0
            for weight in weights[3 * layer:3 * layer + 3]:
                self.qkv_weight[layer, start:start + weight.size(0)].copy_(weight)
                start += weight.size(0)
        self._qkv_versions = versions

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if weight.dtype == self.dtype else weight.to(self.dtype)

    def _forward(self) -> torch.Tensor:
        """Logits (batch, vocab) of the tokens in `ids` at position `pos`; their K/V go into the cache."""
        model, config = self.model, self.model.config
        cos_full, sin_full = self._rotary_rows(model.cos, model.sin, self.pos)
        masks = self._attention_masks(self.pos, self.key_positions, self._windows, self._zero, self._minus_inf)
        x = self._embed(self.ids, model.transformer.wte.weight, self.dtype)
        x0 = x
        for i, block in enumerate(model.transformer.h):
            x, queries, new_kv = self._attention_inputs(
                x, x0, model.resid_lambdas[i], model.x0_lambdas[i], self.qkv_weight[i], cos_full, sin_full,
                config.n_head, config.n_kv_head, config.head_dim)
            cache = self.kv[i]
            cache.scatter_(3, self._write_index, new_kv)
            y = F.scaled_dot_product_attention(queries, cache[0], cache[1], attn_mask=masks[self._layer_mask[i]])
            x = self._block_output(x, y, self._weight(block.attn.c_proj.weight), self._weight(block.mlp.c_fc.weight),
                                   self._weight(block.mlp.c_proj.weight))
        return self._logits(x, self._weight(model.lm_head.weight), config.logit_softcap)

    def _check_position(self, position: int | torch.Tensor) -> None:
        if isinstance(position, torch.Tensor):
            if position.shape != (self.batch_size,) or position.dtype != torch.long:
                raise ValueError(f"per-row positions must be a long tensor of shape ({self.batch_size},), got "
                                 f"{position.dtype} {tuple(position.shape)}")
        elif not 0 <= position < self.max_len:
            raise ValueError(f"position {position} is outside this decoder's cache of {self.max_len} positions; "
                             "build the StaticDecoder with a larger max_len")
        elif position >= self.model.rotary_len:
            raise ValueError(f"position {position} exceeds the rotary table ({self.model.rotary_len} positions)")

    @torch.inference_mode()
    def capture(self) -> None:
        """Record the step as a CUDA graph; later `step` calls replay it. Raises on a non-CUDA model.

        The warm-up steps write the last cache position, which no step reads before writing it itself.
        """
        if not self.kv.is_cuda:
            raise RuntimeError("CUDA graph capture needs the model on a CUDA device")
        self.pos.fill_(self.max_len - 1)
        side = torch.cuda.Stream(device=self.kv.device)
        side.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(side), self._compiling():
            for _ in range(WARMUP_STEPS):
                self._forward()
        torch.cuda.current_stream(self.kv.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._compiling():
            logits = self._forward()
        self._graph, self._graph_logits = graph, logits

    @contextlib.contextmanager
    def _compiling(self):
        """While the compiled pieces may compile: one decoder at a time, up to COMPILED_SHAPES_LIMIT shapes."""
        if not self.compiled:
            yield
            return
        limits = {"recompile_limit": COMPILED_SHAPES_LIMIT,
                  "accumulated_recompile_limit": max(torch._dynamo.config.accumulated_recompile_limit,
                                                     8 * COMPILED_SHAPES_LIMIT)}
        with _COMPILE_LOCK, torch._dynamo.config.patch(limits):
            yield

    @torch.inference_mode()
    def load_prefix(self, cache: KVCache, rows: slice = slice(None)) -> int:
        """Copy a filled cache (batch 1 or as many rows as it fills) into positions 0..cache.pos of `rows`
        (default: all); returns cache.pos."""
        config = self.model.config
        if (cache.num_layers, cache.num_heads, cache.head_dim) != (config.n_layer, config.n_kv_head, config.head_dim):
            raise ValueError("load_prefix needs a KVCache with the model's num_layers, n_kv_head and head_dim")
        filled = len(range(self.batch_size)[rows])
        if cache.positions is not None:
            raise ValueError("load_prefix copies a cache whose rows sit at one position")
        if cache.batch_size not in (1, filled):
            raise ValueError(f"load_prefix copies a cache of batch 1 or {filled} (the rows it fills), got batch "
                             f"{cache.batch_size}")
        if cache.pos > self.max_len:
            raise ValueError(f"the cache holds {cache.pos} positions, more than this decoder's {self.max_len}")
        self.kv[:, 0, rows, :, :cache.pos].copy_(cache.k[:, :, :, :cache.pos])
        self.kv[:, 1, rows, :, :cache.pos].copy_(cache.v[:, :, :, :cache.pos])
        return cache.pos

    @torch.inference_mode()
    def step(self, ids: torch.Tensor | list[int], position: int | torch.Tensor) -> torch.Tensor:
        """Float32 logits (batch, vocab) for `ids` (one token per row) at `position`; K/V stored there.

        `position` is one int for every row, or a (batch,) long tensor on the decoder's device with each
        row's own position; such a tensor is used as given (checking its range would wait for the device),
        so the caller keeps it inside the cache and the rotary table. Each row's earlier positions must
        already be filled (by `load_prefix` or earlier steps). Query, key or value weights updated in place
        since the last step are copied into `qkv_weight` first.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() != self.batch_size:
            raise ValueError(f"step takes one token per row ({self.batch_size}), got {ids.numel()}")
        self._check_position(position)
        self.sync_weights()
        self.ids.copy_(ids.reshape(-1))
        if isinstance(position, torch.Tensor):
            self.pos.copy_(position)
        else:
            self.pos.fill_(position)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        return self._forward()
