"""Training throughput benchmark: `python -m scripts.bench_train --depth 20 --precision bf16 --kernel native`.

Random tokens through the real model (`nanochat.gpt.GPT`), optimizer (`MuonAdamW`) and `torch.compile`
path of base_train, with no data loading. Prints one JSON line per configuration: tokens/s, step time, MFU
against the datasheet peak (`nanochat.hardware`) and against a bf16 8192^3 matmul measured in the same
process, peak memory, and every step's loss. `--profile` splits the step into data, forward, backward and
optimizer time with CUDA events (it synchronises every step, so its tokens/s is a little lower);
`--kernels N` profiles two more steps with torch.profiler and lists the N kernels that took the most time.
`--matmul-floor` times every linear layer's three products alone at the step's rows
(`nanochat.matmul_floor`) and reports their sum per step: the part of the step that only faster matrix
products could shorten.

Several configurations in one process: `--configs "depth=20,kernel=liger;depth=12,window_pattern=SSSL"`
(';' between configurations, ',' between field=value overrides of the flags given).

Multi-GPU: `torchrun --nproc_per_node N -m scripts.bench_train ...`. The optimizer averages gradients
itself: by default after backward, with `--overlap` during it (blocks compiled one by one,
`GPT.compile_regions`, so each block's gradients leave while earlier blocks compute). Every step's
global batch (N x grad_accum x device_batch_size rows) is generated from the seed and the step number
alone, and rank r's micro-step m reads rows (m*N + r)*B .. +B, so one GPU with N x
accumulation sees exactly the data of N GPUs: their losses must agree (the loss parity check).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin, get_type_hints

import torch
import torch.distributed as dist

from nanochat.attention_kernels import resolve_window_kernel
from nanochat.configargs import EXIT_OK, UsageError, require, require_appendable, run_stage
from nanochat.gpt import GPT
from nanochat.gpu_site import apply_site_fixes
from nanochat.hardware import peak_flops
from nanochat.kernels import isolate_liger_from_compile
from nanochat.matmul_floor import matmul_floor
from nanochat.precision import apply_precision, autocast_precision
from nanochat.profiling import profile_steps
from nanochat.runtime import print0, setup_runtime, teardown_runtime, torchrun_ranks
from nanochat.scaling import derive

MATMUL_SIZE = 8192
KERNEL_PROFILE_STEPS = 2


@dataclass
class BenchTrainConfig:
    """Measure training throughput on random tokens (see the module docstring)."""

    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    vocab_size: int = 32768
    window_pattern: str = field(default="L", metadata={"help": "per-layer windows, e.g. SSSL"})
    device_batch_size: int = 32
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    precision: Literal["bf16", "fp32", "fp8", "nvfp4"] = "bf16"
    kernel: Literal["native", "liger"] = field(default="native", metadata={"help": "loss kernel"})
    attention: Literal["auto", "cudnn", "flex", "sdpa"] = field(default="auto", metadata={
        "help": "sliding-window layers: cudnn (cudnn-frontend, the [gpu] extra), flex (FlexAttention), sdpa "
                "(dense mask); auto: cudnn if it works here, else flex"})
    steps: int = field(default=10, metadata={"help": "timed optimizer steps"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compilation happens here)"})
    compile: bool = True
    fullgraph: bool = field(default=True, metadata={
        "help": "compile with fullgraph=True (falls back to graph breaks allowed, and says so)"})
    overlap: bool = field(default=False, metadata={
        "help": "multi-GPU: compile block by block and reduce gradients during backward (slower on NVLink "
                "H200s; for slower links)"})
    profile: bool = False
    kernels: int = field(default=0, metadata={
        "help": "after the timed steps, profile 2 more and list the N kernels with the most device time"})
    matmul_floor: bool = field(default=False, metadata={
        "help": "also time each linear layer's forward, input-gradient and weight-gradient products alone "
                "and report their sum per step (bf16 or fp32 configurations)"})
    configs: str = field(default="", metadata={"help": "';'-separated configurations of ','-separated overrides"})
    seed: int = 42
    device_type: str = "auto"
    out: str = field(default="", metadata={"help": "append the JSON lines to this file as well"})

    def __post_init__(self) -> None:
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "vocab_size", "device_batch_size",
                     "grad_accum", "steps"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.warmup >= 1, "--warmup must be at least 1 (the first step compiles)")
        require(self.window_pattern != "" and set(self.window_pattern) <= {"S", "L"},
                f"--window-pattern must be made of S and L, got {self.window_pattern!r}")
        autocast_precision(self.precision)
        if self.out:
            require_appendable(self.out, "--out")
        require(not self.matmul_floor or self.precision in ("bf16", "fp32"),
                f"--matmul-floor times bf16 or fp32 products, not {self.precision}: drop it or use --precision bf16")

    def label(self) -> str:
        return (f"d{self.depth} {self.window_pattern} b{self.device_batch_size}x{self.grad_accum} {self.precision} "
                f"{self.kernel} {self.attention}{'' if self.compile else ' eager'}")


def expand_configs(base: BenchTrainConfig) -> list[BenchTrainConfig]:
    """The configurations named by `base.configs` (each overriding `base`), or just `base`."""
    if not base.configs.strip():
        return [base]
    hints = get_type_hints(BenchTrainConfig)
    names = {f.name for f in dataclasses.fields(BenchTrainConfig)} - {"configs"}
    result = []
    for spec in base.configs.split(";"):
        overrides = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            require(sep == "=" and key in names, f"--configs: bad override {item!r}; use field=value with a flag name")
            kind, text = hints[key], value.strip()
            if kind is bool:
                require(text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"),
                        f"--configs: {item}: expected true or false")
                overrides[key] = text.lower() in ("1", "true", "yes", "on")
            elif kind is int:
                try:
                    overrides[key] = int(text)
                except ValueError:
                    raise UsageError(f"--configs: {item}: expected an int") from None
            else:
                choices = get_args(kind) if get_origin(kind) is Literal else ()
                require(not choices or text in choices, f"--configs: {item}: expected one of {', '.join(choices)}")
                overrides[key] = text
        result.append(dataclasses.replace(base, configs="", **overrides))
    return result


def global_batch(step: int, rows: int, seq_len: int, vocab_size: int, seed: int, device) -> torch.Tensor:
    """The whole step's token rows (rows, seq_len + 1), a function of (seed, step) only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, vocab_size, (rows, seq_len + 1), generator=generator, device=device)


def micro_batch(batch: torch.Tensor, micro_step: int, rank: int, world: int, rows: int):
    start = (micro_step * world + rank) * rows
    chunk = batch[start:start + rows]
    return chunk[:, :-1], chunk[:, 1:]


def measure_matmul_flops(device) -> float:
    """Median FLOP/s of a bf16 8192^3 matmul on random data (CUDA events, 3 warm-ups, 20 timed)."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * MATMUL_SIZE ** 3 / statistics.median(times)


class _Phases:
    """CUDA-event timestamps of one step's phases (only with --profile)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, name: str) -> None:
        if self.enabled:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))

    def totals(self) -> dict[str, float]:
        """Milliseconds per phase: each mark closes the phase that started at the previous mark."""
        self.marks[-1][1].synchronize()
        result: dict[str, float] = {}
        for (_, previous), (name, event) in zip(self.marks, self.marks[1:]):
            result[name] = result.get(name, 0.0) + previous.elapsed_time(event)
        self.marks.clear()
        return result


def _build(config: BenchTrainConfig, runtime, world: int):
    hp = derive(config.depth, aspect_ratio=config.aspect_ratio, head_dim=config.head_dim,
                max_seq_len=config.max_seq_len, vocab_size=config.vocab_size, window_pattern=config.window_pattern,
                device_batch_size=config.device_batch_size, world_size=world,
                total_batch_size=config.device_batch_size * config.max_seq_len * world * config.grad_accum,
                num_iterations=config.warmup + config.steps)
    with torch.device("meta"):
        model = GPT(hp.model_config)
    model.to_empty(device=runtime.device)
    model.init_weights()
    cuda = runtime.device_type == "cuda"
    precision = apply_precision(model, config.precision, runtime.device_type,
                                torch.cuda.get_device_name(runtime.device) if cuda else runtime.device_type,
                                torch.cuda.get_device_capability(runtime.device) if cuda else (0, 0))
    model.set_loss_kernel(config.kernel)
    windowed = hp.model_config.windowed_layers() > 0
    window_kernel = resolve_window_kernel(config.attention, runtime.device, config.head_dim) if windowed else "sdpa"
    window_layers = model.set_window_kernel(window_kernel)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5)
    return hp, model, optimizer, precision, window_kernel, window_layers


def run_config(config: BenchTrainConfig, runtime, matmul_flops: float | None) -> dict:
    world, rank = runtime.world_size, runtime.rank
    cuda = runtime.device_type == "cuda"
    torch.manual_seed(config.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    hp, model, optimizer, precision, window_kernel, window_layers = _build(config, runtime, world)
    config = dataclasses.replace(config, attention=window_kernel)
    print0(runtime, f"[{config.label()}] {precision.describe()}; {config.attention} window layers: {window_layers}")
    fullgraph = config.fullgraph and config.compile
    overlap = config.overlap and config.compile and world > 1
    if overlap:
        model.compile_regions()
        optimizer.overlap_reductions(model.backward_order())
        train_model, fullgraph = model, False
    else:
        train_model = torch.compile(model, dynamic=False, fullgraph=fullgraph) if config.compile else model
    B, T = config.device_batch_size, config.max_seq_len
    rows = B * world * config.grad_accum
    phases = _Phases(config.profile and cuda)
    phase_totals: dict[str, float] = {}
    losses: list[torch.Tensor] = []
    compile_note = None

    def step(index: int) -> torch.Tensor:
        loss_sum = torch.zeros((), device=runtime.device)
        phases.mark("start")
        batch = global_batch(index, rows, T, config.vocab_size, config.seed, runtime.device)
        for micro in range(config.grad_accum):
            x, y = micro_batch(batch, micro, rank, world, B)
            phases.mark("data")
            with runtime.autocast():
                loss = train_model(x, y)
            phases.mark("forward")
            optimizer.reduce_in_backward = micro == config.grad_accum - 1
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
            phases.mark("backward")
        optimizer.step()
        model.zero_grad(set_to_none=True)
        phases.mark("optimizer")
        return loss_sum / config.grad_accum

    try:
        losses.append(step(0))
    except Exception as exc:  # a fullgraph=True failure shows at the first call; retry allowing graph breaks
        if isinstance(exc, torch.OutOfMemoryError) or not fullgraph:
            raise
        compile_note = f"fullgraph compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); " \
                       "recompiled with graph breaks allowed"
        print0(runtime, f"WARNING: [{config.label()}] {compile_note}")
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        fullgraph = False
        if config.kernel == "liger":
            isolate_liger_from_compile(True)
        train_model = torch.compile(model, dynamic=False)
        losses.append(step(0))
    if phases.enabled:
        phases.totals()
    for index in range(1, config.warmup):
        losses.append(step(index))
        if phases.enabled:
            phases.totals()
    runtime.synchronize()
    runtime.barrier()
    start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
    wall = time.perf_counter()
    if cuda:
        start.record()
    for index in range(config.warmup, config.warmup + config.steps):
        losses.append(step(index))
        if phases.enabled:
            for name, ms in phases.totals().items():
                phase_totals[name] = phase_totals.get(name, 0.0) + ms
    if cuda:
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - wall
    kernel_table = None
    if config.kernels:
        profiled = iter(range(config.warmup + config.steps, config.warmup + config.steps + KERNEL_PROFILE_STEPS))
        kernel_table = profile_steps(lambda: step(next(profiled)), KERNEL_PROFILE_STEPS, runtime.device_type)
        for line in kernel_table.lines(config.kernels):
            print0(runtime, f"[{config.label()}] {line}")
    loss_values = torch.stack(losses).float()
    if runtime.distributed:
        dist.all_reduce(loss_values, op=dist.ReduceOp.SUM)
        loss_values /= world
    step_seconds = seconds / config.steps
    tokens_per_step = rows * T
    tok_per_s = tokens_per_step / step_seconds
    per_gpu = hp.flops_per_token * tok_per_s / world
    device_name = torch.cuda.get_device_name(runtime.device) if cuda else runtime.device_type
    peak = peak_flops(device_name, config.precision) if cuda else None
    bf16_peak = peak_flops(device_name, "bf16") if cuda else None
    result = {
        "config": config.label(), "depth": config.depth, "window_pattern": config.window_pattern,
        "device_batch_size": B, "grad_accum": config.grad_accum, "world_size": world,
        "precision": config.precision, "kernel": config.kernel, "attention": config.attention,
        "window_layers": window_layers, "converted_layers": precision.converted_layers,
        "compile": config.compile, "fullgraph": fullgraph, "compile_note": compile_note, "overlap": overlap,
        "device": device_name, "params": hp.params.total, "flops_per_token": hp.flops_per_token,
        "tokens_per_step": tokens_per_step, "step_ms": 1000 * step_seconds, "tok_per_s": tok_per_s,
        "mfu_datasheet": per_gpu / peak.flops if peak else None,
        "datasheet_peak": peak.source if peak else None,
        "mfu_bf16_datasheet": per_gpu / bf16_peak.flops if bf16_peak else None,
        "matmul_tflops": matmul_flops / 1e12 if matmul_flops else None,
        "mfu_vs_matmul": per_gpu / matmul_flops if matmul_flops else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(runtime.device) / 1e9 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(runtime.device) / 1e9 if cuda else None,
        "losses": [round(v, 5) for v in loss_values.tolist()],
    }
    if config.matmul_floor:
        floor = matmul_floor(model, B * T, config.grad_accum, runtime.autocast_dtype or torch.float32, runtime.device)
        result["matmul_floor"] = floor.as_json()
        result["matmul_floor_share"] = floor.ms_per_step / result["step_ms"]
        print0(runtime, f"[{config.label()}] linear layers' products alone: {floor.ms_per_step:.1f} ms of the "
                        f"{result['step_ms']:.1f} ms step ({100 * result['matmul_floor_share']:.0f}%)")
    if kernel_table is not None:
        result["kernels"] = kernel_table.as_json(config.kernels)
    if phase_totals:
        result["profile_ms_per_step"] = {k: round(v / config.steps, 2) for k, v in phase_totals.items()}
    return result


def _release(runtime) -> None:
    torch._dynamo.reset()
    gc.collect()
    if runtime.device_type == "cuda":
        torch.cuda.empty_cache()


def _table(results: list[dict]) -> list[str]:
    lines = [f"{'config':44} {'tok/s':>10} {'step ms':>8} {'MFU ds':>7} {'MFU mm':>7} {'mem GB':>7}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:44} {r['error']}")
            continue
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        name = f"{r['config']} x{r['world_size']}gpu"
        lines.append(f"{name:44} {r['tok_per_s']:>10,.0f} {r['step_ms']:>8.1f} "
                     f"{pct(r['mfu_datasheet']):>7} {pct(r['mfu_vs_matmul']):>7} {mem:>7}")
    return lines


def main(config: BenchTrainConfig) -> int:
    configs = expand_configs(config)
    if config.device_type in ("auto", "cuda") and torch.cuda.is_available():
        apply_site_fixes(torch.cuda.get_device_properties(torchrun_ranks(os.environ)[1]))
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed, precision=autocast_precision(config.precision))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for c in configs:
        autocast_precision(c.precision)
        require(runtime.device_type == "cuda" or c.precision in ("bf16", "fp32"),
                f"--precision {c.precision} needs CUDA")
        if c.attention != "auto":  # an --attention that cannot run here fails before any measurement
            resolve_window_kernel(c.attention, runtime.device, c.head_dim)
    try:
        matmul = measure_matmul_flops(runtime.device) if runtime.device_type == "cuda" else None
        results = []
        for c in configs:
            autocast_dtype = None if autocast_precision(c.precision) == "fp32" else torch.bfloat16
            runtime = dataclasses.replace(runtime, autocast_dtype=autocast_dtype)
            try:
                result = run_config(c, runtime, matmul)
            except torch.OutOfMemoryError:
                result = {"config": c.label(), "error": "out of memory"}
            except Exception as exc:  # one broken configuration must not cost the others their measurement
                result = {"config": c.label(), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            isolate_liger_from_compile(False)
            _release(runtime)
            results.append(result)
            if runtime.is_master:
                line = json.dumps(result)
                print(line, flush=True)
                if config.out:
                    with open(config.out, "a") as handle:
                        handle.write(line + "\n")
        for line in _table(results):
            print0(runtime, line)
    finally:
        teardown_runtime(runtime)
    return EXIT_OK


def cli(argv=None) -> int:
    return run_stage(main, BenchTrainConfig, argv, prog="python -m scripts.bench_train")


if __name__ == "__main__":
    sys.exit(cli())
