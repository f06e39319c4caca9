"""Preallocated key/value cache for incremental decoding with `nanochat.gpt.GPT`.

One cache holds every layer's keys and values for a batch of sequences that all sit at the same position
`pos`. A forward pass with the cache inserts the new tokens' K/V layer by layer; the last layer's insert
advances `pos`, so `pos` always counts the tokens the model has already seen. Sliding-window layers keep
their whole history here too: the window is applied by the attention mask, not by evicting entries.

Prompts of different lengths decode side by side after `prefill_rows`: each row then has its own position
(`positions`, a device tensor; slot i of a row holds its token at position i), new tokens are written at
each row's own slots, and `pos` counts the slots in use (the furthest row's position). The model reads
`query_positions` for the rotary angles and the attention mask of each row.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of shape (num_layers, batch, kv_heads, max_len, head_dim), filled up to `pos`."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, max_len: int, num_layers: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("max_len", max_len), ("num_layers", num_layers)):
            if value <= 0:
                raise ValueError(f"KVCache {name} must be positive, got {value}")
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.num_layers = num_layers
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.positions: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every cached token (the memory is reused, not freed)."""
        self.pos = 0
        self.positions = None

    def query_positions(self, new_tokens: int) -> torch.Tensor | None:
        """Positions (batch, new_tokens) of the next tokens when rows sit at different positions, else None
        (every row's next tokens are at pos..pos+new_tokens)."""
        if self.positions is None:
            return None
        return self.positions[:, None] + torch.arange(new_tokens, device=self.positions.device)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, new_tokens, head_dim) at positions pos.. of `layer`.

        Returns that layer's keys and values for positions 0..pos+new_tokens. The insert into the last layer
        advances `pos`, so all layers of one forward pass write at the same positions. With per-row
        `positions`, row r's tokens go to its slots positions[r].., and every row advances.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        new_tokens = k.size(2)
        end = self.pos + new_tokens
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} tokens do not fit in max_len={self.max_len}; "
                             "build the cache with a larger max_len")
        if k.size(0) != self.batch_size:
            raise ValueError(f"KVCache holds batch {self.batch_size}, got keys for batch {k.size(0)}")
        if self.positions is None:
            self.k[layer, :, :, self.pos:end] = k
            self.v[layer, :, :, self.pos:end] = v
        else:
            rows = torch.arange(self.batch_size, device=k.device)[:, None]
            slots = self.query_positions(new_tokens)
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        k_all = self.k[layer, :, :, :end]
        v_all = self.v[layer, :, :, :end]
        if layer == self.num_layers - 1:
            self.pos = end
            if self.positions is not None:
                self.positions += new_tokens
        return k_all, v_all

    def prefill_from(self, other: KVCache) -> None:
        """Copy a batch-1 (or same-batch) cache into this one, e.g. to sample N answers to one prompt."""
        self._check_shape(other)
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"prefill_from copies a batch of 1 or {self.batch_size}, got {other.batch_size}")
        if other.pos > self.max_len:
            raise ValueError(f"source cache holds {other.pos} tokens, more than max_len={self.max_len}")
        self.k[:, :, :, :other.pos] = other.k[:, :, :, :other.pos]
        self.v[:, :, :, :other.pos] = other.v[:, :, :, :other.pos]
        self.pos = other.pos
        self.positions = None

    def prefill_rows(self, prefixes: list[KVCache], rows_each: int) -> None:
        """Copy batch-1 caches into consecutive groups of `rows_each` rows (prefix i fills rows
        i * rows_each..), e.g. to sample answers to several prompts at once. When the prefixes hold different
        numbers of tokens, every row keeps its own position from then on (see the module docstring)."""
        if rows_each < 1 or len(prefixes) * rows_each != self.batch_size:
            raise ValueError(f"prefill_rows fills {self.batch_size} rows; got {len(prefixes)} prefixes of "
                             f"{rows_each} rows")
        lengths = [prefix.pos for prefix in prefixes]
        if max(lengths) > self.max_len:
            raise ValueError(f"a prefix holds {max(lengths)} tokens, more than max_len={self.max_len}")
        for i, prefix in enumerate(prefixes):
            self._check_shape(prefix)
            if prefix.batch_size != 1:
                raise ValueError(f"prefill_rows copies batch-1 caches, got batch {prefix.batch_size}")
            rows = slice(i * rows_each, (i + 1) * rows_each)
            self.k[:, rows, :, :prefix.pos] = prefix.k[:, :, :, :prefix.pos]
            self.v[:, rows, :, :prefix.pos] = prefix.v[:, :, :, :prefix.pos]
        self.pos = max(lengths)
        self.positions = None
        if len(set(lengths)) > 1:
            self.positions = torch.tensor(lengths, device=self.k.device).repeat_interleave(rows_each)

    def _check_shape(self, other: KVCache) -> None:
        if (other.num_layers, other.num_heads, other.head_dim) != (self.num_layers, self.num_heads, self.head_dim):
            raise ValueError("copying between caches needs the same num_layers, num_heads and head_dim")
