"""The training loop the post-training stages (mid_train, chat_sft) share.

A stage decides what data to train on; this module does the rest the same way base_train does: resolve the
source checkpoint, skip a finished run, resume from the latest complete checkpoint of the output folder,
train with gradient accumulation and the warmup/constant/warmdown schedule, check the validation
bits-per-byte (on assistant tokens), save atomic checkpoints whose meta carries the model config, save and
exit 75 on SIGUSR1/SIGUSR2/SIGTERM, exit 3 on a non-finite loss keeping the last good checkpoint, print one
line per step (on CUDA one step late, so the GPU never waits for the host) and write the stage's report
section.

The loss of a step is the mean over every supervised target token of all micro-batches on all ranks (targets
of -1 do not count), so padding and a varying number of assistant tokens per batch weigh nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from nanochat import checkpoint as ckpt
from nanochat.attention_kernels import ATTENTION_FLAG_HELP
from nanochat.configargs import UsageError, require
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_loading import find_checkpoint
from nanochat.optim import OptimizerFlags
from nanochat.paths import base_dir, checkpoint_dir, tokenizer_dir
from nanochat.report import write_section
from nanochat.runtime import Runtime, print0
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
from nanochat.tokenizer import load_token_bytes
from nanochat.tracking import TRACKING_OFF, require_tracker, start_tracking


@dataclass
class FinetuneConfig(OptimizerFlags):
    """Flags every post-training stage shares (each stage's config extends this one)."""

    model_tag: str | None = field(default=None, metadata={
        "help": "tag of the source checkpoint, also the output folder (default: the newest source tag)"})
    step: int | None = field(default=None, metadata={"help": "source checkpoint step (default: its latest)"})
    device_batch_size: int = field(default=32, metadata={"help": "rows per device per micro-step"})
    max_seq_len: int | None = field(default=None, metadata={"help": "row length in tokens (default: the model's)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1: one pass over the mixture"})
    lr_scale: float = field(default=1.0, metadata={"help": "multiplies every learning rate below"})
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = field(default=150, metadata={"help": "steps between validation checks (-1: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per device per check"})
    save_every: int = field(default=500, metadata={
        "help": "steps between checkpoints (0 or less: none in between); one is always written at the end"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept while training, the newest ones (0 or less: all)"})
    identity_file: str | None = field(default=None, metadata={
        "help": "JSONL of identity conversations (default: the cache's tasks/identity.jsonl)"})
    identity_epochs: int = field(default=1, metadata={"help": "passes over the identity conversations"})
    mixture_seed: int = field(default=0, metadata={"help": "seed of the shuffled order of the training mixture"})
    run: str = field(default=TRACKING_OFF, metadata={"help": f"wandb run name; {TRACKING_OFF!r} keeps wandb off"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest complete checkpoint of this tag"})
    force: bool = field(default=False, metadata={
        "help": "start this tag over (its checkpoints are replaced), even if finished; the same command "
                "again resumes a stopped --force run"})
    seed: int = 42
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model (default: on for CUDA)"})
    attention: Literal["auto", "cudnn", "flex", "sdpa"] = field(default="auto", metadata={
        "help": ATTENTION_FLAG_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        require_tracker(self.run)
        for name in ("device_batch_size", "eval_batches"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.max_seq_len is None or self.max_seq_len > 1, "--max-seq-len must be at least 2")
        require(self.num_iterations == -1 or self.num_iterations > 0, "--num-iterations must be positive or -1")
        require(self.eval_every == -1 or self.eval_every > 0, "--eval-every must be positive or -1")
        require(math.isfinite(self.lr_scale) and self.lr_scale > 0,
                f"--lr-scale must be a finite positive number, got {self.lr_scale}")
        require(self.identity_epochs >= 0, "--identity-epochs must be 0 or more")
        require(self.device_type in ("auto", "cuda", "mps", "cpu"), "--device-type must be auto, cuda, mps or cpu")
        require(0 <= self.warmup_ratio <= 1 and 0 <= self.warmdown_ratio <= 1
                and self.warmup_ratio + self.warmdown_ratio <= 1,
                "--warmup-ratio and --warmdown-ratio must be in [0, 1] and add up to at most 1")
        require(0 <= self.final_lr_frac <= 1, "--final-lr-frac must be in [0, 1]")


class TrainFeed(Protocol):
    """A rank's endless training batches with a resumable position."""

    epoch: int
    truncated: int
    examples_consumed: int

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Source:
    """The checkpoint a stage starts from."""

    phase: str
    tag: str
    step: int
    directory: Path


def resolve_source(phase: str, config: FinetuneConfig) -> Source:
    tag, step, directory = find_checkpoint(phase, config.model_tag, config.step)
    return Source(phase, tag, step, directory)


def finished_step(out_dir: Path) -> int | None:
    """The step of the finished run in `out_dir`, or None when it holds none (or an unfinished one)."""
    step = ckpt.latest_complete_step(out_dir)
    meta = ckpt.read_meta(out_dir, step) if step is not None else None
    return step if meta is not None and meta.get("finished") else None


@dataclass
class FinetuneJob:
    """Everything the loop needs from a stage."""

    stage: str  # report section name, e.g. "mid_train"
    phase: str  # checkpoint phase written, e.g. "mid"
    report_phase: str  # "MID" or "SFT"
    config: FinetuneConfig
    source: Source
    model_config: GPTConfig
    num_iterations: int
    grad_accum_steps: int
    make_feed: Callable[[dict[str, Any] | None], TrainFeed]  # saved position (or None) -> this rank's feed
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # same batches on every call
    dynamic_shapes: bool  # whether batch widths vary (padded rows): compile accordingly
    run_settings: dict[str, Any]  # what else decides the run (batch, data): a resume must match it
    report_extras: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return checkpoint_dir(self.phase, self.source.tag)


def _build_model(model_config: GPTConfig, state: dict, device: torch.device) -> GPT:
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(state)
    return model


def _set_learning_rates(optimizer, lr_mult: float, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group.get("kind") == "muon":
            group["momentum"] = muon_momentum(step)


def _all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(value)
    return value


def _gather(obj: Any, runtime: Runtime) -> list[Any]:
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def run_finetune(job: FinetuneJob, runtime: Runtime) -> int:
    """Train `job` to its end (0), until a stop signal (75) or until the loss is not finite (3)."""
    config, device, out_dir = job.config, runtime.device, job.out_dir
    if runtime.is_master:
        ckpt.remove_stale_temporaries(out_dir)
    runtime.barrier()
    start_step = step_to_resume(out_dir, dataclasses.asdict(config), config.resume, config.force)
    meta = ckpt.read_meta(out_dir, start_step) if start_step is not None else None
    source_meta = dataclasses.asdict(job.source) | {"directory": str(job.source.directory)}
    run_settings = {"num_iterations": job.num_iterations, "lr_scale": config.lr_scale,
                    "warmup_ratio": config.warmup_ratio, "warmdown_ratio": config.warmdown_ratio,
                    "final_lr_frac": config.final_lr_frac, **config.optimizer_kwargs(),
                    "identity_file": config.identity_file, "identity_epochs": config.identity_epochs,
                    "mixture_seed": config.mixture_seed, **job.run_settings}
    if meta is not None:
        require(meta["world_size"] == runtime.world_size,
                f"the checkpoint at step {start_step} in {out_dir} was written by {meta['world_size']} processes; "
                f"resume with the same number (now {runtime.world_size}) or pass --force")
        require(meta["source"]["step"] == job.source.step and meta["source"]["phase"] == job.source.phase,
                f"the checkpoint in {out_dir} continues {meta['source']['phase']} step {meta['source']['step']}, "
                f"not {job.source.phase} step {job.source.step}; pass --force to start over")
        require_same_run(meta, run_settings, f"the checkpoint at step {start_step} in {out_dir}")

    if meta is None:
        model_state, _, _ = ckpt.load_checkpoint(job.source.directory, job.source.step, device, load_optimizer=False)
    else:
        model_state, optim_state, meta = ckpt.load_checkpoint(out_dir, start_step, device, rank=runtime.rank)
    model = _build_model(job.model_config, model_state, device)
    del model_state
    window_line = model.choose_window_kernel(config.attention)
    if window_line:
        print0(runtime, window_line)
    model.train()
    optimizer = model.setup_optimizer(**config.optimizer_kwargs(config.lr_scale))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    loop: dict[str, Any] = {"step": 0, "training_seconds": 0.0, "tokens_seen": 0, "supervised_tokens": 0,
                            "val_history": [], "loss_history": []}
    feed_state = None
    if meta is not None:
        restore_rng_and_optimizer(optimizer, optim_state, runtime)
        loop = meta["loop_state"]
        feed_state = meta["loader_states"][runtime.rank]
        print0(runtime, f"resumed from {out_dir} at step {start_step}")
    else:
        print0(runtime, f"starting from {job.source.phase} checkpoint {job.source.directory} step {job.source.step}")

    use_compile = config.compile if config.compile is not None else runtime.device_type == "cuda"
    train_model = torch.compile(model, dynamic=job.dynamic_shapes) if use_compile else model
    token_bytes = load_token_bytes(tokenizer_dir()).to(device)
    schedule = LRSchedule(job.num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
    stop = StopRequest().install()
    wandb_run = start_tracking(config.run, runtime.is_master, dataclasses.asdict(config), job_type=job.stage)
    try:
        feed = job.make_feed(feed_state)
    except ValueError as exc:  # the saved data position does not fit the data found now
        raise UsageError(f"cannot resume the checkpoint at step {start_step} in {out_dir}: {exc} (or start over "
                         "with --force)") from None

    def evaluate(step: int) -> None:
        model.eval()
        bpb = evaluate_bpb(model, job.val_batches(), token_bytes, autocast=runtime.autocast(),
                           distributed=runtime.distributed)
        model.train()
        loop["val_history"].append([step, bpb])
        print0(runtime, f"step {step:06d} | val bpb (assistant tokens) {bpb:.4f}")
        if wandb_run is not None:
            wandb_run.log({"step": step, "val/bpb": bpb})

    def save(step: int, finished: bool) -> None:
        if finished:  # before the meta that marks the run finished: a rerun after a kill in between writes it again
            totals = _all_reduce_sum(torch.tensor([feed.examples_consumed, feed.truncated], device=device), runtime)
            if runtime.is_master:
                _write_report(job, loop, runtime, examples=int(totals[0]), truncated=int(totals[1]))
        optim_out = rng_and_optimizer_state(optimizer, runtime)
        meta_out = {"model_config": dataclasses.asdict(job.model_config), "user_config": dataclasses.asdict(config),
                    "source": source_meta, "num_iterations": job.num_iterations, "run_settings": run_settings,
                    "loader_states": _gather(feed.state_dict(), runtime), "loop_state": {**loop, "step": step},
                    "finished": finished}
        ckpt.save_checkpoint(out_dir, step, model.state_dict(), optim_out, meta_out, rank=runtime.rank,
                             world_size=runtime.world_size, barrier=runtime.barrier,
                             keep=0 if finished else config.keep_checkpoints)
        print0(runtime, f"step {step:06d} | checkpoint saved to {out_dir}")

    first_step = loop["step"]
    readback = LossReadback(device)
    pending: list[tuple[int, float]] = []  # (step, lr multiplier) of the step whose numbers are on their way

    def settle() -> bool:
        """Log the pending step (on CUDA one step late, see LossReadback); False if its loss was not finite."""
        if not pending:
            return True
        step, lr_mult = pending.pop()
        (loss_sum, supervised, tokens), dt = readback.read()
        supervised, tokens = int(supervised), int(tokens)
        train_loss = loss_sum / max(supervised, 1)
        if not math.isfinite(train_loss):
            print0(runtime, f"step {step:06d} | loss is {train_loss}: training diverged. The last good "
                            f"checkpoint in {out_dir} is kept; lower the learning rates (--lr-scale) and resume.")
            return False
        step += 1
        if not (use_compile and step == first_step + 1):
            loop["training_seconds"] += dt
        loop["tokens_seen"] += tokens
        loop["supervised_tokens"] += supervised
        loop["loss_history"].append([step, train_loss])
        print0(runtime, f"step {step:06d}/{job.num_iterations:06d} ({100 * step / job.num_iterations:.1f}%) "
                        f"| loss {train_loss:.4f} | lr x{lr_mult:.3f} | supervised tokens {supervised:,} "
                        f"| dt {1000 * dt:.0f} ms | tok/s {tokens / dt:,.0f} | epoch {feed.epoch}")
        if wandb_run is not None:
            wandb_run.log({"step": step, "train/loss": train_loss, "train/lr_mult": lr_mult})
        return True

    def train_step(step: int) -> bool:
        began = readback.begin()
        lr_mult = schedule.multiplier(step)
        _set_learning_rates(optimizer, lr_mult, step)
        numbers = _forward_backward(train_model, feed, job.grad_accum_steps, runtime)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if not settle():  # the previous step: on CUDA this one is queued behind it, so the GPU stays busy
            return False
        readback.start(numbers, began)
        pending.append((step, lr_mult))
        return readback.lagging or settle()

    if meta is None:
        start_over(out_dir, runtime)
    try:
        exit_code = run_steps(first_step, StepSchedule(job.num_iterations, config.eval_every, config.save_every),
                              stop, runtime, train_step=train_step, evaluate=evaluate, save=save,
                              evaluations=loop["val_history"], settle=settle)
    finally:
        feed.close()
        if wandb_run is not None:
            wandb_run.finish()
    return exit_code


def _forward_backward(train_model, feed: TrainFeed, grad_accum_steps: int, runtime: Runtime) -> torch.Tensor:
    """Forward and backward over one step's micro-batches; returns (loss summed over supervised tokens,
    supervised tokens, input tokens) as one float64 device tensor, each summed over ranks, for the host to read
    when it needs them (nothing here waits for the GPU). Gradients are left in place for the optimizer (which
    averages them over ranks), scaled so that they are those of the mean loss over every supervised token."""
    batches = [next(feed) for _ in range(grad_accum_steps)]
    numbers = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # loss sum, supervised, input tokens
    for _, y in batches:
        numbers[1] += (y >= 0).sum()
    numbers[2] = float(sum(x.numel() for x, _ in batches))
    _all_reduce_sum(numbers, runtime)
    denominator = (numbers[1].clamp(min=1) / runtime.world_size).float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for x, y in batches:
        with runtime.autocast():
            loss = train_model(x, y, loss_reduction="sum")
        (loss / denominator).backward()
        loss_sum += loss.detach()
    numbers[0] = _all_reduce_sum(loss_sum, runtime)
    return numbers


def first_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], count: int):
    for _ in range(count):
        yield next(batches)


def _write_report(job: FinetuneJob, loop: dict[str, Any], runtime: Runtime, examples: int, truncated: int) -> None:
    val = loop["val_history"]
    seconds = loop["training_seconds"]
    write_section(job.stage, {
        "phase": job.report_phase,
        "settings": dataclasses.asdict(job.config),
        "source": f"{job.source.phase}_checkpoints/{job.source.tag} step {job.source.step}",
        "device": str(runtime.device) if runtime.device_type != "cuda" else torch.cuda.get_device_name(),
        "world_size": runtime.world_size,
        "num_iterations": job.num_iterations,
        "grad_accum_steps": job.grad_accum_steps,
        "examples_seen": examples,
        "truncated_conversations": truncated,
        "tokens_seen": loop["tokens_seen"],
        "supervised_tokens": loop["supervised_tokens"],
        "seconds": seconds,
        "final_val_bpb": val[-1][1] if val else None,
        "final_train_loss": loop["loss_history"][-1][1] if loop["loss_history"] else None,
        "val_history": val,
        "loss_history": loop["loss_history"],
        **job.report_extras,
    }, root=base_dir())


def source_model_config(source: Source) -> GPTConfig:
    meta = ckpt.read_meta(source.directory, source.step)
    if meta is None or "model_config" not in meta:
        raise UsageError(f"the {source.phase} checkpoint {source.directory} step {source.step} has no model config; "
                         "retrain it with this version")
    return GPTConfig(**meta["model_config"])


def check_sequence_length(config: FinetuneConfig, model_config: GPTConfig) -> int:
    """The row length: --max-seq-len, else the model's; never beyond what the model was built for."""
    length = config.max_seq_len or model_config.sequence_len
    require(length <= model_config.sequence_len,
            f"--max-seq-len {length} exceeds the model's sequence length {model_config.sequence_len}")
    return length
