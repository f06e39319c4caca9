"""Text generation with the KV cache: sampling, stop tokens and the calculator tool, for chat, eval and RL.

`Engine(model, tokenizer).generate(prompt_ids, num_samples, ...)` runs the prompt through the model once at
batch 1, copies that cache into a batch of `num_samples` rows and then decodes one token per row per step,
yielding `(token_column, mask_column)`. A row that writes `<|python_start|> expr <|python_end|>` gets the
calculator's answer (`nanochat.tool_eval.evaluate`) fed back as `<|output_start|> result <|output_end|>`;
those forced tokens have mask 0, sampled tokens mask 1. `generate_batch` collects whole answers, each cut at
its first `<|assistant_end|>` or `<|bos|>`. `generate_batches(prompts, num_samples, ...)` does that for
several prompts in one batch of len(prompts) * num_samples rows: each prompt runs through the model on its
own at batch 1 as above, its cache fills its rows, and when the prompts differ in length every row decodes
at its own position (`KVCache.prefill_rows`, `StaticDecoder.step` with per-row positions), so at
temperature 0 every row writes what `generate_batch` writes for its prompt alone; evaluation and RL
rollouts decode this way, since a decode step of many rows costs about what one of a few rows costs where
decoding is launch-bound (GPUs, docs/benchmarks.md). `TextStream` turns a token stream into printable
text without splitting a UTF-8 character that spans tokens. The whole batch samples from one generator,
so seeded sampling is reproducible per call, not per prompt.

`Engine(..., decode=...)` picks how the answer tokens are decoded after the prompt (the prompt itself always
goes through the model's own forward): "dynamic" (the default) grows a `KVCache` through `model.forward`;
"static" runs `nanochat.static_decode.StaticDecoder`'s fixed-shape step eagerly; "graph" replays that step
as a CUDA graph, and "compiled-graph" compiles its pieces with torch.compile before capturing (the fastest:
see docs/benchmarks.md); "auto" is "compiled-graph" for a GPT on CUDA and "dynamic" otherwise;
`batch_decode_path(device)` picks the path for evaluation and RL rollouts. A
compiled-graph decoder that fails to build says so once on stderr and the engine uses "graph" from then on;
any other static path that cannot run (not a GPT, no CUDA, capture failed) says so once and decodes
dynamically. `warm_up()` builds the decoder ahead of the first answer (the chat CLI and web server call
it at start). One captured decoder, for the latest (rows, cache length bucket), is kept and
reused; a generate call that overlaps another one on the same engine decodes dynamically.
`last_decode_path` names the path the latest generate call took.

The model is anything shaped like `nanochat.gpt.GPT`: a `config` with `n_layer`, `n_kv_head`, `head_dim`
and `sequence_len`, optionally a `rotary_len` (the positions its rotary tables cover), and
`forward(idx, kv_cache=...)` returning logits (batch, tokens, vocab). Prompts of different lengths share a
batch only with a GPT (its forward follows the cache's per-row positions); for any other model
`generate_batches` decodes them one prompt at a time.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat import tool_eval
from nanochat.kv_cache import KVCache
from nanochat.static_decode import StaticDecoder, as_gpt, cache_length_bucket
from nanochat.tokenizer import Tokenizer

DECODE_PATHS = ("dynamic", "static", "graph", "compiled-graph", "auto")


def batch_decode_path(device: torch.device | str) -> str:
    """The decode path for evaluation and RL rollouts: many answers to prompts of many lengths, from a model
    that may be training between calls.

    On CUDA it is "graph": the captured static step decodes 30-40x faster than "dynamic"
    (docs/benchmarks.md), its capture takes milliseconds, so each new (samples, cache length) shape costs
    little, and it reads the parameters in place, so optimizer steps are followed. "compiled-graph" would
    compile for seconds per new shape. Elsewhere "dynamic": without CUDA graphs the static step measured
    -16% to +37% against it at the cpu site's shape (docs/benchmarks.md), a few seconds per CPU pipeline.
    """
    return "graph" if torch.device(device).type == "cuda" else "dynamic"


@dataclass
class _RowState:
    """Per-sample bookkeeping: tokens the tool must force next and the python expression being written."""

    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)


class Engine:
    """Sampling from a GPT with a KV cache: `num_samples` answers to one prompt, or to several at once."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, decode: str = "dynamic"):
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
        self.model = model
        self.decode = decode
        self.last_decode_path: str | None = None
        self._decoder: StaticDecoder | None = None
        self._decoder_busy = False
        self._static_unavailable: str | None = None
        self._compile_unavailable: str | None = None
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

    def autocast(self):
        """The autocast context the engine runs the model under: bf16 on CUDA, none elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def cache_dtype(self) -> torch.dtype:
        """The dtype of the KV caches: bf16 on CUDA, the parameters' dtype elsewhere."""
        if self.device.type == "cuda":
            return torch.bfloat16
        return next(self.model.parameters()).dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for this model on its device, in `cache_dtype()`."""
        config = self.model.config
        return KVCache(batch_size, config.n_kv_head, config.head_dim, max_len, config.n_layer,
                       device=self.device, dtype=self.cache_dtype())

    def generate(self, prompt_ids: list[int], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per decoding step, one token per sample and its mask (1 sampled, 0 forced by the tool).

        Rows keep going after their stop token (the caller decides what to keep); the stream ends after
        `max_tokens` steps, or when prompt plus answer would outgrow the model's positions (`max_context`).
        temperature 0 is greedy; top_k keeps only the k most likely tokens before sampling.
        """
        self._check_request([prompt_ids], num_samples, max_tokens, temperature, top_k)
        steps = min(max_tokens, self.max_context - len(prompt_ids))
        if steps == 0:
            return
        yield from self._decode([prompt_ids], num_samples, steps, temperature, top_k, seed)

    def _check_request(self, prompts: list[list[int]], num_samples: int, max_tokens: int, temperature: float,
                       top_k: int | None) -> None:
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_tokens >= 0, got {num_samples}, {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        for prompt_ids in prompts:
            if not prompt_ids:
                raise ValueError("generate needs a non-empty prompt (start it with <|bos|>)")
            if len(prompt_ids) > self.max_context:
                raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most "
                                 f"{self.max_context}")

    def _forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position, under bf16 autocast on CUDA."""
        with self.autocast():
            return self.model(ids, kv_cache=cache)[:, -1, :]

    # As a decorator on a generator, inference_mode is only on while the generator runs, never in the
    # caller's code between two steps (a `with` block here would leak it into the caller).
    @torch.inference_mode()
    def _decode(self, prompts, num_samples, steps, temperature, top_k, seed):
        """Columns of `steps` tokens for len(prompts) * num_samples rows, prompt i's samples in rows
        i * num_samples..; every prompt must leave room for `steps` tokens in `max_context`."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        prefixes, logits = self._prefill(prompts)
        logits = logits.repeat_interleave(num_samples, dim=0)
        batch = len(prompts) * num_samples
        # The last step's token is never fed back, so the cache needs room for steps - 1 answer tokens.
        cache_len = max(len(prompt_ids) for prompt_ids in prompts) + steps - 1
        self.last_decode_path = "dynamic"
        decoder = self._claim_decoder(batch, cache_len) if steps > 1 else None
        rows = [_RowState() for _ in range(batch)]
        try:
            if decoder is None:
                cache = self.new_cache(batch, cache_len)
                cache.prefill_rows(prefixes, num_samples)
                del prefixes
                yield from self._dynamic_steps(logits, cache, rows, steps, temperature, top_k, generator)
            else:
                start = self._load_rows(decoder, prefixes, num_samples)
                del prefixes
                yield from self._static_steps(logits, decoder, start, rows, steps, temperature, top_k, generator)
        finally:
            if decoder is not None:
                self._decoder_busy = False

    def _prefill(self, prompts: list[list[int]]) -> tuple[list[KVCache], torch.Tensor]:
        """Each prompt through the model at batch 1: their caches, and their last logits (prompts, vocab)."""
        caches, logits = [], []
        for prompt_ids in prompts:
            caches.append(self.new_cache(1, len(prompt_ids)))
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            logits.append(self._forward(ids, caches[-1]))
        return caches, torch.cat(logits)

    def _load_rows(self, decoder: StaticDecoder, prefixes: list[KVCache], num_samples: int) -> int | torch.Tensor:
        """Copy prefix i into the decoder's rows i * num_samples..; returns where the answers start: one
        position, or a device tensor of per-row positions when the prompts differ in length."""
        for i, prefix in enumerate(prefixes):
            decoder.load_prefix(prefix, slice(i * num_samples, (i + 1) * num_samples))
        lengths = [prefix.pos for prefix in prefixes]
        if len(set(lengths)) == 1:
            return lengths[0]
        return torch.tensor(lengths, device=self.device).repeat_interleave(num_samples)

    def _next_column(self, rows: list[_RowState], sampled: list[int]) -> tuple[list[int], list[int]]:
        """Each row's token (its next forced one, else the sampled one) and mask; tool use is tracked."""
        tokens, masks = [], []
        for row, token in zip(rows, sampled):
            if row.forced:
                tokens.append(row.forced.popleft())
                masks.append(0)
            else:
                tokens.append(token)
                masks.append(1)
            self._track_tool_use(row, tokens[-1])
        return tokens, masks

    def _dynamic_steps(self, logits, cache, rows, steps, temperature, top_k, generator):
        for step in range(steps):
            sampled = sample_next(logits, temperature, top_k, generator).tolist()
            tokens, masks = self._next_column(rows, sampled)
            yield tokens, masks
            if step + 1 < steps:
                column = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
                logits = self._forward(column, cache)

    def _static_steps(self, logits, decoder, start, rows, steps, temperature, top_k, generator):
        """Like _dynamic_steps, but the next step is launched before this column reaches the host.

        The fed tokens are assembled on the device (sampled, or the row's next forced token, which is known
        before sampling), so on CUDA the GPU computes step s + 1 while the caller handles column s. `start`:
        the position of the first answer token, one int or a device tensor per row.
        """
        cuda = logits.is_cuda
        host = torch.empty(len(rows), dtype=torch.long, pin_memory=cuda)
        for step in range(steps):
            sampled = sample_next(logits, temperature, top_k, generator)
            host.copy_(sampled, non_blocking=cuda)
            copied = torch.cuda.Event() if cuda else None
            if copied is not None:
                copied.record()
            if step + 1 < steps:
                forced = [row.forced[0] if row.forced else -1 for row in rows]
                fed = sampled
                if any(token >= 0 for token in forced):
                    forced = torch.tensor(forced, dtype=torch.long, device=sampled.device)
                    fed = torch.where(forced >= 0, forced, sampled)
                logits = decoder.step(fed, start + step)
            if copied is not None:
                copied.synchronize()
            yield self._next_column(rows, host.tolist())

    def _requested_static_path(self) -> str | None:
        """The static path this engine should use now ("static", "graph", "compiled-graph"), or None."""
        if self.decode == "dynamic" or self._static_unavailable is not None:
            return None
        cuda = self.device.type == "cuda"
        if self.decode == "auto":
            if not cuda or as_gpt(self.model) is None:
                return None
            return "graph" if self._compile_unavailable else "compiled-graph"
        if as_gpt(self.model) is None:
            return self._fall_back(f"the model is a {type(self.model).__name__}, not a nanochat GPT")
        if self.decode != "static" and not cuda:
            return self._fall_back(f"CUDA graphs need a CUDA model, this one is on {self.device.type}")
        return "graph" if self.decode == "compiled-graph" and self._compile_unavailable else self.decode

    def _fall_back(self, reason: str) -> None:
        """Remember that the static path cannot run here and say so on stderr (once per engine)."""
        self._static_unavailable = reason
        print(f"nanochat.engine: decode={self.decode!r} is unavailable ({reason}); "
              "decoding with the dynamic KV cache instead", file=sys.stderr, flush=True)
        return None

    def _claim_decoder(self, batch_size: int, cache_len: int) -> StaticDecoder | None:
        """A static decoder for this call (built and captured if the kept one does not fit), or None."""
        path = self._requested_static_path()
        if path is None or self._decoder_busy:
            return None
        max_len = cache_length_bucket(cache_len)
        kept = self._decoder
        if kept is None or (kept.batch_size, kept.max_len) != (batch_size, max_len) or kept.is_stale():
            self._decoder = kept = None  # free the old cache before allocating the new one
            try:
                kept = self._build_decoder(path, batch_size, max_len)
            except Exception as exc:
                if path != "compiled-graph":  # any other failure to build or capture means: decode dynamically
                    return self._fall_back(f"building the {path} decoder failed: {type(exc).__name__}: {exc}")
                self._compile_unavailable = f"{type(exc).__name__}: {exc}"
                print(f"nanochat.engine: compiling the decode step failed ({self._compile_unavailable}); "
                      "decoding with the uncompiled CUDA graph instead", file=sys.stderr, flush=True)
                return self._claim_decoder(batch_size, cache_len)
            self._decoder = kept
        self._decoder_busy = True
        self.last_decode_path = path
        return kept

    def _build_decoder(self, path: str, batch_size: int, max_len: int) -> StaticDecoder:
        if path == "compiled-graph":
            print(f"nanochat.engine: compiling the decode step for {batch_size} sample(s) and {max_len} positions "
                  "(once per shape, seconds)", file=sys.stderr, flush=True)
        decoder = StaticDecoder(as_gpt(self.model), batch_size, max_len, dtype=self.cache_dtype(),
                                compile_step=path == "compiled-graph")
        if path != "static":
            decoder.capture()
        return decoder

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

    def warm_up(self, num_samples: int = 1) -> float:
        """Generate two throw-away tokens so that building (on CUDA: compiling and capturing) the decoder for
        `num_samples` happens now rather than in the first answer; returns the seconds it took."""
        start = time.perf_counter()
        for _ in self.generate([self.tokenizer.bos_id], num_samples, max_tokens=2, temperature=0.0):
            pass
        return time.perf_counter() - start

    def generate_batch(self, prompt_ids: list[int], num_samples: int = 1, max_tokens: int = 256,
                       temperature: float = 1.0, top_k: int | None = None,
                       seed: int = 42) -> tuple[list[list[int]], list[list[int]]]:
        """Whole answers (prompt not included) and their masks, each cut before its first stop token."""
        columns = self.generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed)
        return self._collect(columns, num_samples)

    def generate_batches(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                         temperature: float = 1.0, top_k: int | None = None,
                         seed: int = 42) -> list[tuple[list[list[int]], list[list[int]]]]:
        """`generate_batch` for several prompts decoded as one batch: per prompt, its answers and masks.

        Sampling draws from one generator seeded with `seed` for the whole batch, so at temperature > 0 the
        answers are reproducible but not those of `generate_batch` per prompt. Rows of one batch decode the
        same number of steps, so a prompt whose answers the context limit would cut before `max_tokens` is
        decoded on its own (`generate_batch`, same seed); so is every prompt when their lengths differ and
        the model is not a GPT (whose forward is what follows rows at different positions).
        """
        self._check_request(prompts, num_samples, max_tokens, temperature, top_k)
        together = [i for i, prompt_ids in enumerate(prompts) if len(prompt_ids) + max_tokens <= self.max_context]
        if as_gpt(self.model) is None and len({len(prompts[i]) for i in together}) > 1:
            together = []
        results = {}
        if together and max_tokens > 0:
            columns = self._decode([prompts[i] for i in together], num_samples, max_tokens, temperature, top_k,
                                   seed)
            answers, masks = self._collect(columns, len(together) * num_samples)
            for k, i in enumerate(together):
                rows = slice(k * num_samples, (k + 1) * num_samples)
                results[i] = (answers[rows], masks[rows])
        return [results[i] if i in results else
                self.generate_batch(prompts[i], num_samples, max_tokens, temperature, top_k, seed)
                for i in range(len(prompts))]

    def _collect(self, columns: Iterator[tuple[list[int], list[int]]],
                 num_rows: int) -> tuple[list[list[int]], list[list[int]]]:
        """Each row's tokens and masks from a column stream, cut before its first stop token."""
        results: list[list[int]] = [[] for _ in range(num_rows)]
        masks: list[list[int]] = [[] for _ in range(num_rows)]
        done = [False] * num_rows
        for tokens, mask_column in columns:
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
