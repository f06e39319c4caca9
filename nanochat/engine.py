"""Text generation with the KV cache: sampling, stop tokens and the calculator tool, for chat, eval and RL.

`Engine(model, tokenizer).generate(prompt_ids, num_samples, ...)` runs the prompt through the model once at
batch 1, copies that cache into a batch of `num_samples` rows and then decodes one token per row per step,
yielding `(token_column, mask_column)`. A row that writes `<|python_start|> expr <|python_end|>` gets the
calculator's answer (`nanochat.tool_eval.evaluate`) fed back as `<|output_start|> result <|output_end|>`;
those forced tokens have mask 0, sampled tokens mask 1. `generate_batch` collects whole answers, each cut at
its first `<|assistant_end|>` or `<|bos|>`. `TextStream` turns a token stream into printable text without
splitting a UTF-8 character that spans tokens.

The model is anything shaped like `nanochat.gpt.GPT`: a `config` with `n_layer`, `n_kv_head`, `head_dim`
and `sequence_len`, optionally a `rotary_len` (the positions its rotary tables cover), and
`forward(idx, kv_cache=...)` returning logits (batch, tokens, vocab).
"""

from __future__ import annotations

import codecs
import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat import tool_eval
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import Tokenizer


@dataclass
class _RowState:
    """Per-sample bookkeeping: tokens the tool must force next and the python expression being written."""

    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)


class Engine:
    """Sampling from a GPT with a KV cache, for one prompt and `num_samples` answers at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.max_context = int(getattr(model, "rotary_len", config.sequence_len))
        special = tokenizer.special_id
        self.stop_ids = frozenset((special("<|assistant_end|>"), tokenizer.bos_id))
        self._python_start = special("<|python_start|>")
        self._python_end = special("<|python_end|>")
        self._output_start = special("<|output_start|>")
        self._output_end = special("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _cache_dtype(self) -> torch.dtype:
        if self.device.type == "cuda":
            return torch.bfloat16
        return next(self.model.parameters()).dtype

    def _new_cache(self, batch_size: int, max_len: int) -> KVCache:
        config = self.model.config
        return KVCache(batch_size, config.n_kv_head, config.head_dim, max_len, config.n_layer,
                       device=self.device, dtype=self._cache_dtype())

    def generate(self, prompt_ids: list[int], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per decoding step, one token per sample and its mask (1 sampled, 0 forced by the tool).

        Rows keep going after their stop token (the caller decides what to keep); the stream ends after
        `max_tokens` steps, or when prompt plus answer would outgrow the model's positions (`max_context`).
        temperature 0 is greedy; top_k keeps only the k most likely tokens before sampling.
        """
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt (start it with <|bos|>)")
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_tokens >= 0, got {num_samples}, {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if len(prompt_ids) > self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most {self.max_context}")
        steps = min(max_tokens, self.max_context - len(prompt_ids))
        if steps == 0:
            return
        yield from self._decode(prompt_ids, num_samples, steps, temperature, top_k, seed)

    def _forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position, under bf16 autocast on CUDA."""
        with self._autocast():
            return self.model(ids, kv_cache=cache)[:, -1, :]

    # As a decorator on a generator, inference_mode is only on while the generator runs, never in the
    # caller's code between two steps (a `with` block here would leak it into the caller).
    @torch.inference_mode()
    def _decode(self, prompt_ids, num_samples, steps, temperature, top_k, seed):
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        prompt_cache = self._new_cache(1, len(prompt_ids))
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits = self._forward(prompt, prompt_cache)
        # The last step's token is never fed back, so the cache needs room for steps - 1 answer tokens.
        cache = self._new_cache(num_samples, len(prompt_ids) + steps - 1)
        cache.prefill_from(prompt_cache)
        del prompt_cache
        logits = logits.expand(num_samples, -1)
        rows = [_RowState() for _ in range(num_samples)]
        for step in range(steps):
            sampled = sample_next(logits, temperature, top_k, generator).tolist()
            tokens, masks = [], []
            for row, token in zip(rows, sampled):
                if row.forced:
                    tokens.append(row.forced.popleft())
                    masks.append(0)
                else:
                    tokens.append(token)
                    masks.append(1)
                self._track_tool_use(row, tokens[-1])
            yield tokens, masks
            if step + 1 < steps:
                column = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
                logits = self._forward(column, cache)

    def _track_tool_use(self, row: _RowState, token: int) -> None:
        """Follow a row's python block; at its end queue the calculator's answer as forced tokens."""
        if token == self._python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self._python_end and row.in_python:
            row.in_python = False
            result = tool_eval.evaluate(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([self._output_start, *self.tokenizer.encode(result), self._output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, prompt_ids: list[int], num_samples: int = 1, max_tokens: int = 256,
                       temperature: float = 1.0, top_k: int | None = None,
                       seed: int = 42) -> tuple[list[list[int]], list[list[int]]]:
        """Whole answers (prompt not included) and their masks, each cut before its first stop token."""
        results: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for tokens, mask_column in self.generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, mask) in enumerate(zip(tokens, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_ids:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits (batch, vocab): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class TextStream:
    """Incremental detokenizer: `push(token)` returns the text that became complete (maybe "").

    Tokens are byte-level, so one character can span several tokens; the bytes of an unfinished UTF-8
    sequence are held back until it completes (invalid bytes become U+FFFD). `flush()` returns the rest.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.token_to_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
