"""Decode benchmark: `python -m scripts.bench_decode --depth 20 --batch-sizes 1,16 --mode eager,graph`.

Builds a GPT of the given depth (`nanochat.scaling.derive`, as bench_train does) with random weights,
casts its matrices to bf16 (`--dtype`), and times `nanochat.engine.Engine.generate` on a random prompt of
`--prompt-tokens` tokens for `--new-tokens` greedy steps, once per batch size and mode:

- eager: the Engine's dynamic KV-cache path (`decode="dynamic"`, what the Engine does by default);
- static: the fixed-shape `StaticDecoder` step run eagerly (a check, not fast);
- graph: that step replayed as a CUDA graph; compiled-graph: compiled with torch.compile, then captured.

Every mode first runs one untimed generation (graph modes capture there; its time is `warmup_s`). Prints
one JSON line per run: time to first token (prompt pass and first sample, ms), decode tokens/s per
sequence and in total (the new tokens after the first over the time after the first), and whether the
tokens equal the eager path's (`tokens_match`, `first_mismatch_step`) and those of each mode run before
it at that batch size (`same_tokens_as`: "graph" is the uncompiled step that "compiled-graph" compiles).
`decode_path` is the path the Engine took, so a requested graph path that fell back (it also says so on
stderr) is visible.

`--teacher-forced` (batch 1) then feeds the eager path's tokens through the dynamic cache and each static
mode's decoder side by side and reports how often their argmax agrees, their largest logit difference
and, where the argmax differs, how close the dynamic path's top two logits were.

`--prompts N` (N > 1) measures what RL rollouts and generative evaluation do instead: greedy answers of
`--batch-sizes` samples to N random prompts of `--prompt-tokens` / 2 to `--prompt-tokens` tokens, once
with one `Engine.generate_batch` per prompt and once with one `Engine.generate_batches` for all of them
(each way on its own engine, after one untimed run); one JSON line per batch size and mode with both
times, their ratio and whether the answers are the same.

`--weights init` (the default) is the model's own initialisation, whose attention and MLP output
projections start at zero (like upstream nanochat's benchmark): timing is the same, and the tokens depend
only on the fed token, so they must match exactly. `--weights random` fills every matrix, which makes the
paths' bf16 rounding in attention visible in the tokens.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanochat.configargs import EXIT_OK, UsageError, require, require_appendable, run_stage
from nanochat.engine import Engine
from nanochat.gpt import GPT
from nanochat.runtime import resolve_device_type
from nanochat.scaling import derive
from nanochat.static_decode import StaticDecoder, cache_length_bucket

ENGINE_DECODE = {"eager": "dynamic", "static": "static", "graph": "graph", "compiled-graph": "compiled-graph"}
SPECIAL_TOKENS = ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                  "<|output_end|>")


@dataclass
class BenchDecodeConfig:
    """Measure Engine decoding speed on random weights (see the module docstring)."""

    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    vocab_size: int = 32768
    window_pattern: str = field(default="L", metadata={"help": "per-layer windows, e.g. SSSL"})
    batch_sizes: str = field(default="1,16", metadata={"help": "comma-separated samples per prompt"})
    prompt_tokens: int = 512
    new_tokens: int = 256
    prompts: int = field(default=1, metadata={
        "help": "above 1: time answers to this many prompts of different lengths, one at a time vs together"})
    mode: str = field(default="eager,graph", metadata={"help": "comma-separated: " + ", ".join(ENGINE_DECODE)})
    weights: Literal["init", "random"] = "init"
    dtype: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={
        "help": "dtype of the weight matrices; auto: bf16 on CUDA (decoded under its autocast), else fp32"})
    teacher_forced: bool = field(default=False, metadata={
        "help": "at batch 1, also feed the eager tokens through each static mode and compare the logits"})
    seed: int = 42
    device_type: str = "auto"
    out: str = field(default="", metadata={"help": "append the JSON lines to this file as well"})

    def __post_init__(self) -> None:
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "vocab_size", "prompt_tokens",
                     "new_tokens", "prompts"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.window_pattern != "" and set(self.window_pattern) <= {"S", "L"},
                f"--window-pattern must be made of S and L, got {self.window_pattern!r}")
        if self.out:
            require_appendable(self.out, "--out")
        try:
            sizes = [int(size) for size in self.batch_sizes.split(",")]
        except ValueError:
            raise UsageError(f"--batch-sizes must be comma-separated integers, got {self.batch_sizes!r}") from None
        require(all(size > 0 for size in sizes), f"--batch-sizes must be positive, got {self.batch_sizes!r}")
        modes = self.mode.split(",")
        unknown = [mode for mode in modes if mode not in ENGINE_DECODE]
        require(not unknown, f"--mode {','.join(unknown)} is unknown; use a comma-separated list of "
                             f"{', '.join(ENGINE_DECODE)}")
        try:
            self.device_type = resolve_device_type(self.device_type)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device_type == "cuda" else "fp32"
        require(self.dtype == "fp32" or self.device_type == "cuda",
                f"--dtype bf16 decodes under CUDA's autocast; on {self.device_type} use --dtype fp32 (the default)")

    def batch_size_list(self) -> list[int]:
        return [int(size) for size in self.batch_sizes.split(",")]

    def mode_list(self) -> list[str]:
        return self.mode.split(",")


class NoToolTokenizer:
    """What Engine needs from a tokenizer: special ids, placed past the vocabulary so no weights sample them."""

    def __init__(self, vocab_size: int):
        self._ids = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self._ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        return self._ids[name]


def build_model(config: BenchDecodeConfig) -> GPT:
    hp = derive(config.depth, aspect_ratio=config.aspect_ratio, head_dim=config.head_dim,
                max_seq_len=config.max_seq_len, vocab_size=config.vocab_size, window_pattern=config.window_pattern,
                device_batch_size=1, total_batch_size=config.max_seq_len)
    with torch.device("meta"):
        model = GPT(hp.model_config)
    model.to_empty(device=config.device_type)
    torch.manual_seed(config.seed)
    model.init_weights()
    with torch.no_grad():
        if config.weights == "random":
            for name, param in model.named_parameters():
                if param.dim() == 2 and name != "transformer.wte.weight":
                    param.normal_(0.0, param.size(1) ** -0.5)
            model.x0_lambdas.uniform_(0.2, 0.5)
        if config.dtype == "bf16":
            for param in model.parameters():
                if param.dim() == 2:  # the matrices; the per-layer scalars stay float32
                    param.data = param.data.to(torch.bfloat16)
    return model.eval()


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed_generation(engine: Engine, prompt: list[int], batch_size: int, new_tokens: int,
                     device_type: str) -> tuple[list[list[int]], float, float]:
    """Token columns, seconds to the first column, seconds for all of them (greedy)."""
    synchronize(device_type)
    start = time.perf_counter()
    first = None
    columns = []
    for tokens, _ in engine.generate(prompt, batch_size, max_tokens=new_tokens, temperature=0.0):
        if first is None:
            first = time.perf_counter() - start  # the column is on the host: the GPU work behind it is done
        columns.append(tokens)
    synchronize(device_type)
    return columns, first, time.perf_counter() - start


def first_mismatch(columns: list[list[int]], reference: list[list[int]]) -> int | None:
    for step, (got, expected) in enumerate(zip(columns, reference)):
        if got != expected:
            return step
    return None if len(columns) == len(reference) else min(len(columns), len(reference))


def run_mode(model: GPT, tokenizer: NoToolTokenizer, prompt: list[int], batch_size: int, mode: str,
             config: BenchDecodeConfig) -> tuple[dict, list[list[int]]]:
    engine = Engine(model, tokenizer, decode=ENGINE_DECODE[mode])
    warmup_start = time.perf_counter()
    warmup_tokens = config.new_tokens if mode in ("graph", "compiled-graph") else min(config.new_tokens, 4)
    # the same prompt length and token count put the warm-up in the same cache bucket, so the capture is reused
    for _ in engine.generate(prompt, batch_size, max_tokens=warmup_tokens, temperature=0.0):
        pass
    synchronize(config.device_type)
    warmup_s = time.perf_counter() - warmup_start
    columns, ttft, total = timed_generation(engine, prompt, batch_size, config.new_tokens, config.device_type)
    decode_steps = len(columns) - 1
    per_sequence = decode_steps / (total - ttft) if decode_steps > 0 else 0.0
    result = {
        "mode": mode, "batch_size": batch_size, "decode_path": engine.last_decode_path,
        "depth": config.depth, "weights": config.weights, "dtype": config.dtype,
        "prompt_tokens": len(prompt), "new_tokens": len(columns),
        "ttft_ms": round(ttft * 1000, 3),
        "decode_tok_per_s_per_seq": round(per_sequence, 2),
        "decode_tok_per_s_total": round(per_sequence * batch_size, 2),
        "warmup_s": round(warmup_s, 3),
    }
    del engine
    gc.collect()
    if config.device_type == "cuda":
        torch.cuda.empty_cache()
    return result, columns


@torch.inference_mode()
def teacher_forced_agreement(model: GPT, engine: Engine, prompt: list[int], tokens: list[int], mode: str) -> dict:
    """Feed the eager path's tokens through both the dynamic KV cache and `mode`'s static decoder, one step
    at a time, and compare their logits: how often the argmax agrees, the largest logit difference, and
    the widest top-two gap of the dynamic logits where the argmax differs (a near-tie when that is about
    the logit difference: the paths round differently, neither is wrong)."""
    cache = engine.new_cache(1, len(prompt) + len(tokens))
    with engine.autocast():
        model(torch.tensor([prompt], device=engine.device), kv_cache=cache)
    decoder = StaticDecoder(model, 1, cache_length_bucket(len(prompt) + len(tokens)), dtype=engine.cache_dtype(),
                            compile_step=mode == "compiled-graph")
    if mode != "static":
        decoder.capture()
    decoder.load_prefix(cache)
    agree, max_diff, widest_gap = 0, 0.0, 0.0
    for step, token in enumerate(tokens[:-1]):
        with engine.autocast():
            reference = model(torch.tensor([[token]], device=engine.device), kv_cache=cache)[0, -1].float()
        static = decoder.step([token], len(prompt) + step)[0]
        max_diff = max(max_diff, (static - reference).abs().max().item())
        if int(static.argmax()) == int(reference.argmax()):
            agree += 1
        else:
            top2 = reference.topk(2).values
            widest_gap = max(widest_gap, (top2[0] - top2[1]).item())
    return {"steps": len(tokens) - 1, "argmax_agree": agree, "max_abs_logit_diff": round(max_diff, 5),
            "widest_top2_gap_where_argmax_differs": round(widest_gap, 5)}


def greedy_answers(engine: Engine, prompts: list[list[int]], samples: int, new_tokens: int,
                   together: bool) -> list:
    if together:
        return engine.generate_batches(prompts, samples, max_tokens=new_tokens, temperature=0.0)
    return [engine.generate_batch(prompt, samples, max_tokens=new_tokens, temperature=0.0) for prompt in prompts]


def run_prompts(model: GPT, tokenizer: NoToolTokenizer, prompts: list[list[int]], samples: int, mode: str,
                config: BenchDecodeConfig) -> dict:
    """Seconds for greedy answers to all prompts, one generate_batch per prompt and one generate_batches."""
    seconds, answers, paths = {}, {}, {}
    for together in (False, True):
        engine = Engine(model, tokenizer, decode=ENGINE_DECODE[mode])
        greedy_answers(engine, prompts, samples, config.new_tokens, together)  # graph modes capture here
        synchronize(config.device_type)
        start = time.perf_counter()
        answers[together] = greedy_answers(engine, prompts, samples, config.new_tokens, together)
        synchronize(config.device_type)
        seconds[together] = time.perf_counter() - start
        paths[together] = engine.last_decode_path
    return {"mode": mode, "prompts": len(prompts), "batch_size": samples, "decode_path": paths[True],
            "prompt_tokens": [len(prompt) for prompt in prompts], "new_tokens": config.new_tokens,
            "one_at_a_time_s": round(seconds[False], 4), "together_s": round(seconds[True], 4),
            "speedup": round(seconds[False] / seconds[True], 2), "tokens_match": answers[False] == answers[True]}


def random_prompts(config: BenchDecodeConfig, generator: torch.Generator) -> list[list[int]]:
    lengths = torch.randint(max(1, config.prompt_tokens // 2), config.prompt_tokens + 1, (config.prompts,),
                            generator=generator)
    return [torch.randint(0, config.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def main(config: BenchDecodeConfig) -> int:
    device_type = config.device_type
    model = build_model(config)
    device_name = torch.cuda.get_device_name() if device_type == "cuda" else device_type
    print(f"depth {config.depth}: {model.num_params():,} parameters, {config.dtype} matrices, "
          f"{config.weights} weights, on {device_name}", file=sys.stderr, flush=True)
    tokenizer = NoToolTokenizer(config.vocab_size)
    generator = torch.Generator().manual_seed(config.seed)
    if config.prompts > 1:
        prompts = random_prompts(config, generator)
        for samples in config.batch_size_list():
            for mode in config.mode_list():
                emit(run_prompts(model, tokenizer, prompts, samples, mode, config), config)
        return EXIT_OK
    prompt = torch.randint(0, config.vocab_size, (config.prompt_tokens,), generator=generator).tolist()
    results = []
    for batch_size in config.batch_size_list():
        modes = config.mode_list()
        tokens_by_mode = {}
        if "eager" not in modes:  # the tokens are compared with the eager path's, so compute them untimed
            _, tokens_by_mode["eager"] = run_mode(model, tokenizer, prompt, batch_size, "eager", config)
        for mode in sorted(modes, key=lambda m: m != "eager"):
            result, columns = run_mode(model, tokenizer, prompt, batch_size, mode, config)
            tokens_by_mode.setdefault(mode, columns)
            mismatch = first_mismatch(columns, tokens_by_mode["eager"])
            result.update(tokens_match=mismatch is None, first_mismatch_step=mismatch, device=device_name,
                          same_tokens_as={other: first_mismatch(columns, tokens) is None
                                          for other, tokens in tokens_by_mode.items() if other != mode})
            if config.teacher_forced and batch_size == 1 and mode != "eager" and result["decode_path"] == mode:
                eager_tokens = [column[0] for column in tokens_by_mode["eager"]]
                engine = Engine(model, tokenizer, decode=ENGINE_DECODE[mode])
                result["teacher_forced"] = teacher_forced_agreement(model, engine, prompt, eager_tokens, mode)
            results.append(result)
            emit(result, config)
    print("batch  mode            path            ttft ms  tok/s/seq  tok/s total  match", file=sys.stderr)
    for r in results:
        print(f"{r['batch_size']:>5}  {r['mode']:<14}  {r['decode_path']:<14}  {r['ttft_ms']:>7.1f}  "
              f"{r['decode_tok_per_s_per_seq']:>9.1f}  {r['decode_tok_per_s_total']:>11.1f}  {r['tokens_match']}",
              file=sys.stderr, flush=True)
    return EXIT_OK


def emit(result: dict, config: BenchDecodeConfig) -> None:
    """Print one result as a JSON line (and append it to --out)."""
    line = json.dumps(result)
    print(line, flush=True)
    if config.out:
        with open(config.out, "a") as handle:
            handle.write(line + "\n")


def cli(argv=None) -> int:
    return run_stage(main, BenchDecodeConfig, argv, prog="python -m scripts.bench_decode")


if __name__ == "__main__":
    sys.exit(cli())
