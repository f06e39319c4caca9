"""Base pretraining: `python -m scripts.base_train --depth N`, the same command on every site.

Everything `--depth` implies comes from `nanochat.scaling.derive` and is printed at start. The loop checks
the validation bits-per-byte, writes atomic checkpoints, resumes by itself from the latest complete one,
saves and exits 75 on SIGUSR1/SIGUSR2/SIGTERM, and exits 3 (keeping the last good checkpoint) on a
non-finite loss. One line per step, so `tail -f` on the log tells the story; on CUDA each line comes one
step late, when the next step is already queued (`nanochat.step_loop.LossReadback`), so the GPU never
waits for the log.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanochat import checkpoint as ckpt
from nanochat.attention_kernels import ATTENTION_FLAG_HELP
from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.dataloader import PackedTokenLoader, split_shards
from nanochat.gpt import GPT
from nanochat.gpu_site import apply_site_fixes
from nanochat.hardware import peak_flops
from nanochat.loss_eval import UnigramBaseline, evaluate_bpb
from nanochat.optim import OptimizerFlags
from nanochat.paths import base_dir, check_model_tag, checkpoint_dir, data_dir, tokenizer_dir
from nanochat.precision import apply_precision, autocast_precision
from nanochat.report import write_section
from nanochat.runtime import print0, setup_runtime, teardown_runtime, torchrun_ranks, warn0
from nanochat.scaling import derive
from nanochat.schedule import LRSchedule, muon_momentum
from nanochat.step_loop import (
    LossReadback,
    StepSchedule,
    require_same_run,
    restore_rng_and_optimizer,
    rng_and_optimizer_state,
    run_steps,
    start_over,
    step_to_resume,
)
from nanochat.stopping import StopRequest
from nanochat.tokenizer import Tokenizer, load_token_bytes
from nanochat.tracking import TRACKING_OFF, require_tracker, start_tracking


@dataclass
class BaseTrainConfig(OptimizerFlags):
    """Pretrain a GPT whose size follows from --depth on the parquet shards in the cache."""

    depth: int = field(default=20, metadata={"help": "number of transformer layers: the size dial"})
    aspect_ratio: int = field(default=64, metadata={"help": "model width = depth x aspect ratio, rounded up to the head dim"})
    head_dim: int = field(default=128, metadata={"help": "attention head dimension"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length in tokens"})
    window_pattern: str = field(default="L", metadata={"help": "per-layer attention windows, e.g. SSSL (S short, L full)"})
    device_batch_size: int = field(default=32, metadata={"help": "sequences per device per micro-step"})
    total_batch_size: int = field(default=524288, metadata={"help": "tokens per optimizer step over all devices"})
    num_iterations: int = field(default=-1, metadata={"help": "training steps; -1 derives them from the flags below"})
    target_flops: float = field(default=-1.0, metadata={"help": "training horizon as total FLOPs (-1: off)"})
    target_param_data_ratio: float = field(default=20.0, metadata={"help": "training tokens per parameter (Chinchilla: 20)"})
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = field(default=250, metadata={"help": "steps between validation bits-per-byte checks"})
    eval_tokens: int = field(default=10 * 524288, metadata={"help": "validation tokens per check"})
    sample_every: int = field(default=2000, metadata={"help": "steps between printed samples (-1: never)"})
    save_every: int = field(default=1000, metadata={
        "help": "steps between checkpoints (0 or less: none in between); one is always written at the end"})
    save_final: bool = field(default=True, metadata={
        "help": "write the final checkpoint (--no-save-final: short sweep runs keep only the report)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept while training, the newest ones (0 or less: all)"})
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint folder name (default d<depth>)"})
    run: str = field(default=TRACKING_OFF, metadata={"help": f"wandb run name; {TRACKING_OFF!r} keeps wandb off"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest complete checkpoint of this tag"})
    force: bool = field(default=False, metadata={
        "help": "start this tag over (its checkpoints are replaced), even if finished; the same command "
                "again resumes a stopped --force run"})
    seed: int = 42
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    precision: Literal["auto", "bf16", "fp32", "fp8", "nvfp4"] = field(default="auto", metadata={
        "help": "fp8: block matmuls in float8 (Hopper/Blackwell); nvfp4: TransformerEngine NVFP4 (Blackwell)"})
    kernel: Literal["native", "liger"] = field(default="native", metadata={
        "help": "loss kernel: native, or liger (fused linear cross-entropy, pip install -e '.[gpu]')"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model (default: on for CUDA)"})
    attention: Literal["auto", "cudnn", "flex", "sdpa"] = field(default="auto", metadata={
        "help": ATTENTION_FLAG_HELP})
    overlap: bool = field(default=False, metadata={
        "help": "multi-GPU with compile: compile block by block and reduce gradients during backward (slower "
                "on NVLink H200s, see docs/benchmarks.md; for slower links)"})
    tokenizer_threads: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.depth > 0, f"--depth must be a positive number of layers, got {self.depth}")
        require_tracker(self.run)
        for name in ("aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size",
                     "eval_every", "eval_tokens", "tokenizer_threads"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(set(self.window_pattern) <= {"S", "L"} and self.window_pattern != "",
                f"--window-pattern must be made of S and L, got {self.window_pattern!r}")
        require(self.num_iterations == -1 or self.num_iterations > 0, "--num-iterations must be positive or -1")
        require(self.device_type in ("auto", "cuda", "mps", "cpu"), "--device-type must be auto, cuda, mps or cpu")
        require(0 <= self.warmup_ratio <= 1 and 0 <= self.warmdown_ratio <= 1
                and self.warmup_ratio + self.warmdown_ratio <= 1,
                "--warmup-ratio and --warmdown-ratio must be in [0, 1] and add up to at most 1")
        require(0 <= self.final_lr_frac <= 1, "--final-lr-frac must be in [0, 1]")
        if self.model_tag is None:
            self.model_tag = f"d{self.depth}"
        check_model_tag(self.model_tag)


def _check_inputs() -> tuple[Tokenizer, list]:
    tok_dir = tokenizer_dir()
    require((tok_dir / "tokenizer.json").is_file(),
            f"no tokenizer in {tok_dir}: run `python -m scripts.tok_train` first")
    train_files = split_shards(data_dir(), "train")
    return Tokenizer.load(tok_dir), train_files


def _batches(loader, count: int):
    return itertools.islice(iter(loader), count)


def main(config: BaseTrainConfig) -> int:
    tokenizer, train_files = _check_inputs()
    val_files = split_shards(data_dir(), "val")
    if config.device_type in ("auto", "cuda") and torch.cuda.is_available():
        # before the first CUDA allocation: the allocator reads PYTORCH_ALLOC_CONF when it starts
        apply_site_fixes(torch.cuda.get_device_properties(torchrun_ranks(os.environ)[1]))
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed, precision=autocast_precision(config.precision))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return _train(config, runtime, tokenizer, train_files, val_files)
    finally:
        teardown_runtime(runtime)


def _train(config, runtime, tokenizer, train_files, val_files) -> int:
    try:
        hp = derive(config.depth, aspect_ratio=config.aspect_ratio, head_dim=config.head_dim,
                    max_seq_len=config.max_seq_len, vocab_size=tokenizer.vocab_size,
                    window_pattern=config.window_pattern, device_batch_size=config.device_batch_size,
                    world_size=runtime.world_size, total_batch_size=config.total_batch_size,
                    num_iterations=config.num_iterations, target_flops=config.target_flops,
                    target_param_data_ratio=config.target_param_data_ratio)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for line in hp.describe():
        print0(runtime, line)

    run_settings = {"num_iterations": hp.num_iterations, "total_batch_size": hp.total_batch_size,
                    "warmup_ratio": config.warmup_ratio, "warmdown_ratio": config.warmdown_ratio,
                    "final_lr_frac": config.final_lr_frac, **config.optimizer_kwargs()}
    device = runtime.device
    out_dir = checkpoint_dir("base", config.model_tag)
    if runtime.is_master:
        ckpt.remove_stale_temporaries(out_dir)
    runtime.barrier()
    start_step = step_to_resume(out_dir, dataclasses.asdict(config), config.resume, config.force)
    meta = ckpt.read_meta(out_dir, start_step) if start_step is not None else None
    if meta is not None and meta.get("finished") and not config.force:
        print0(runtime, f"base_train: {out_dir} already holds the finished run (step {start_step}); "
                        "nothing to do (--force trains again)")
        return EXIT_OK
    if meta is not None:
        require(meta["world_size"] == runtime.world_size,
                f"the checkpoint at step {start_step} was written by {meta['world_size']} processes; resume with "
                f"the same number (now {runtime.world_size}) or start a new --model-tag")
        require(meta["model_config"] == dataclasses.asdict(hp.model_config),
                f"the checkpoint in {out_dir} is for a different model; use another --model-tag or --force")
        require_same_run(meta, run_settings, f"the checkpoint at step {start_step} in {out_dir}")

    with torch.device("meta"):
        model = GPT(hp.model_config)
    model.to_empty(device=device)
    model.init_weights()
    cuda = runtime.device_type == "cuda"
    precision = apply_precision(model, config.precision, runtime.device_type,
                                torch.cuda.get_device_name(device) if cuda else "",
                                torch.cuda.get_device_capability(device) if cuda else (0, 0))
    print0(runtime, precision.describe())
    model.set_loss_kernel(config.kernel)
    window_line = model.choose_window_kernel(config.attention)
    if window_line:
        print0(runtime, window_line)
    optimizer = model.setup_optimizer(**config.optimizer_kwargs())
    token_bytes = load_token_bytes(tokenizer_dir()).to(device)
    train_counts = torch.zeros(tokenizer.vocab_size, dtype=torch.int64, device=device)
    loop = {"step": 0, "training_seconds": 0.0, "tokens_seen": 0, "smooth_loss": 0.0,
            "val_history": [], "loss_history": []}
    loader_state = None
    if meta is not None:
        model_state, optim_state, meta = ckpt.load_checkpoint(out_dir, start_step, device, rank=runtime.rank)
        model.load_state_dict(model_state)
        restore_rng_and_optimizer(optimizer, optim_state, runtime)
        train_counts.copy_(optim_state["train_counts"].to(device))
        loop = meta["loop_state"]
        loader_state = meta["loader_states"][runtime.rank]
        print0(runtime, f"resumed from {out_dir} at step {start_step}")
    use_compile = config.compile if config.compile is not None else runtime.device_type == "cuda"
    if use_compile and config.overlap and runtime.distributed:
        model.compile_regions()
        optimizer.overlap_reductions(model.backward_order())
        train_model = model
        print0(runtime, "torch.compile: on, block by block, gradients reduced during backward (the first steps "
                        "include compilation)")
    else:
        train_model = torch.compile(model, dynamic=False) if use_compile else model
        if use_compile:
            print0(runtime, "torch.compile: on (the first steps include compilation)")

    B, T = config.device_batch_size, config.max_seq_len
    # counted with index_add_, not torch.bincount, which reads the largest id back to the host every micro-step
    token_ones = torch.ones(B * T, dtype=torch.int64, device=device)
    try:
        loader = PackedTokenLoader(train_files, tokenizer, B, T, rank=runtime.rank, world_size=runtime.world_size,
                                   device=device, tokenizer_threads=config.tokenizer_threads, state=loader_state)
    except ValueError as exc:  # the saved data position does not fit the shards found now
        raise UsageError(f"cannot resume the checkpoint at step {start_step} in {out_dir}: {exc} (or start over "
                         "with --force or another --model-tag)") from None
    schedule = LRSchedule(hp.num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
    peak_precision = config.precision if config.precision in ("fp8", "nvfp4") else "bf16"
    peak = peak_flops(torch.cuda.get_device_name(device), peak_precision) if runtime.device_type == "cuda" else None
    if runtime.device_type == "cuda" and peak is None:
        warn0(runtime, f"MFU is not reported: no peak FLOP/s known for {torch.cuda.get_device_name(device)!r} "
                       "(set NANOCHAT_PEAK_FLOPS to the card's dense bf16 FLOP/s)")
    stop = StopRequest().install()
    wandb_run = start_tracking(config.run, runtime.is_master, {"config": dataclasses.asdict(config),
                                                               "model": dataclasses.asdict(hp.model_config)})
    val_steps = max(1, config.eval_tokens // (B * T * runtime.world_size))

    def evaluate(step: int) -> None:
        model.eval()
        val_loader = PackedTokenLoader(val_files, tokenizer, B, T, rank=runtime.rank,
                                       world_size=runtime.world_size, device=device,
                                       tokenizer_threads=config.tokenizer_threads)
        unigram = UnigramBaseline(train_counts, token_bytes)
        with val_loader:
            bpb = evaluate_bpb(model, unigram.observing(_batches(val_loader, val_steps)), token_bytes,
                               autocast=runtime.autocast(), distributed=runtime.distributed)
        baseline = unigram.bpb(distributed=runtime.distributed)
        model.train()
        loop["val_history"].append([step, bpb, baseline])
        print0(runtime, f"step {step:06d} | val bpb {bpb:.4f} | unigram baseline {baseline:.4f}")
        if wandb_run is not None:
            wandb_run.log({"step": step, "val/bpb": bpb, "val/unigram_bpb": baseline})

    def write_report() -> None:
        if runtime.is_master:
            _write_report(config, hp, loop, runtime, peak)

    def save(step: int, finished: bool) -> None:
        if finished:  # before the meta that marks the run finished: a rerun after a kill in between writes it again
            write_report()
        all_loader_states = [loader.state_dict()]
        if runtime.distributed:
            import torch.distributed as dist

            all_loader_states = [None] * runtime.world_size
            dist.all_gather_object(all_loader_states, loader.state_dict())
        optim_state = {**rng_and_optimizer_state(optimizer, runtime), "train_counts": train_counts.cpu()}
        meta_out = {"model_config": dataclasses.asdict(hp.model_config), "user_config": dataclasses.asdict(config),
                    "num_iterations": hp.num_iterations, "run_settings": run_settings,
                    "loader_states": all_loader_states,
                    "loop_state": {**loop, "step": step}, "finished": finished}
        ckpt.save_checkpoint(out_dir, step, model.state_dict(), optim_state, meta_out, rank=runtime.rank,
                             world_size=runtime.world_size, barrier=runtime.barrier,
                             keep=0 if finished else config.keep_checkpoints)
        print0(runtime, f"step {step:06d} | checkpoint saved to {out_dir}")

    first_step = loop["step"]
    timed = {"seconds": 0.0, "steps": 0}  # this process's timed steps (the ETA's rate; a resume starts afresh)
    readback = LossReadback(device)
    pending: list[tuple[int, float]] = []  # (step, lr multiplier) of the step whose loss is on its way

    def settle() -> bool:
        """Log the pending step (on CUDA one step late, see LossReadback); False if its loss was not finite."""
        if not pending:
            return True
        step, lr_mult = pending.pop()
        train_loss, dt = readback.read()
        if not math.isfinite(train_loss):
            print0(runtime, f"step {step:06d} | loss is {train_loss}: training diverged. The last good "
                            f"checkpoint in {out_dir} is kept; lower the learning rates and resume.")
            return False
        step += 1
        tokens = hp.total_batch_size
        loop["tokens_seen"] += tokens
        if not (use_compile and step == first_step + 1):
            loop["training_seconds"] += dt
            timed["seconds"] += dt
            timed["steps"] += 1
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        smooth = loop["smooth_loss"] / (1 - 0.9 ** step)
        loop["loss_history"].append([step, train_loss])
        tok_per_s = tokens / dt
        mfu = (f" | mfu {100 * hp.flops_per_token * tok_per_s / (peak.flops * runtime.world_size):.1f}%"
               if peak is not None else "")
        remaining = (hp.num_iterations - step) * (timed["seconds"] / max(timed["steps"], 1))
        print0(runtime, f"step {step:06d}/{hp.num_iterations:06d} ({100 * step / hp.num_iterations:.1f}%) "
                        f"| loss {train_loss:.4f} (smooth {smooth:.4f}) | lr x{lr_mult:.3f} "
                        f"| dt {1000 * dt:.0f} ms | tok/s {tok_per_s:,.0f}{mfu} "
                        f"| eta {remaining / 60:.1f} min")
        if wandb_run is not None:
            wandb_run.log({"step": step, "train/loss": train_loss, "train/tok_per_s": tok_per_s,
                           "train/lr_mult": lr_mult})
        if config.sample_every > 0 and step % config.sample_every == 0 and runtime.is_master:
            _print_samples(model, tokenizer, runtime)
        return True

    def train_step(step: int) -> bool:
        began = readback.begin()
        lr_mult = schedule.multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if group.get("kind") == "muon":
                group["momentum"] = muon_momentum(step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(hp.grad_accum_steps):
            x, y = next(loader)
            train_counts.index_add_(0, y.reshape(-1), token_ones)
            with runtime.autocast():
                loss = train_model(x, y)
            loss_sum += loss.detach()
            optimizer.reduce_in_backward = micro == hp.grad_accum_steps - 1
            (loss / hp.grad_accum_steps).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if not settle():  # the previous step: on CUDA this one is queued behind it, so the GPU stays busy
            return False
        readback.start(loss_sum / hp.grad_accum_steps, began)
        pending.append((step, lr_mult))
        return readback.lagging or settle()

    if meta is None:
        start_over(out_dir, runtime)
    steps = StepSchedule(hp.num_iterations, config.eval_every, config.save_every, config.save_final)
    with loader:
        exit_code = run_steps(first_step, steps, stop, runtime, train_step=train_step, evaluate=evaluate,
                              save=save, evaluations=loop["val_history"], settle=settle)
    if wandb_run is not None:
        wandb_run.finish()
    if exit_code == EXIT_OK and not config.save_final:
        write_report()
    return exit_code


@torch.no_grad()
def _print_samples(model, tokenizer, runtime, max_new_tokens: int = 24) -> None:
    """Greedy continuations of a few fixed prompts (full recomputation: this is a progress glimpse)."""
    model.eval()
    for prompt in ("The capital of", "Once upon a time", "12 plus 7 is"):
        ids = torch.tensor([tokenizer.encode(prompt, prepend=tokenizer.bos_id)], device=runtime.device)
        for _ in range(max_new_tokens):
            with runtime.autocast():
                logits = model(ids[:, -model.config.sequence_len:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        print0(runtime, f"sample | {tokenizer.decode(ids[0, 1:].tolist())!r}")
    model.train()


def _write_report(config, hp, loop, runtime, peak) -> None:
    val = loop["val_history"]
    seconds = loop["training_seconds"]
    write_section("base_train", {
        "settings": dataclasses.asdict(config),
        "derived": hp.describe(),
        "device": str(runtime.device) if runtime.device_type != "cuda" else torch.cuda.get_device_name(),
        "world_size": runtime.world_size,
        "num_params": hp.params.total,
        "num_iterations": hp.num_iterations,
        "tokens_seen": loop["tokens_seen"],
        "seconds": seconds,
        "tokens_per_second": loop["tokens_seen"] / seconds if seconds else None,
        "mfu_percent": (100 * hp.flops_per_token * loop["tokens_seen"] / seconds / (peak.flops * runtime.world_size)
                        if peak is not None and seconds else None),
        "final_val_bpb": val[-1][1] if val else None,
        "min_val_bpb": min(v[1] for v in val) if val else None,
        "unigram_val_bpb": val[-1][2] if val else None,
        "val_history": val,
        "loss_history": loop["loss_history"],
    }, root=base_dir())


def cli(argv=None) -> int:
    return run_stage(main, BaseTrainConfig, argv, prog="python -m scripts.base_train")


if __name__ == "__main__":
    sys.exit(cli())
