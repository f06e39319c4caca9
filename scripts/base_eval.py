"""Evaluate a base checkpoint: `python -m scripts.base_eval [--model-tag d20] [--step N]`.

Measures bits per byte on the train and validation shards, prints a few greedy samples, and computes the
CORE metric when the cache holds the eval bundle (`eval_bundle/`). The demo corpus has no bundle: CORE is
skipped with one line. With real data a missing bundle is a usage error (exit 2) found before any work.
Under torchrun the batches and CORE examples are split across ranks. Writes report section `base_eval`;
running it again on the same checkpoint, data and settings does nothing (`--force` evaluates again).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.core_eval import evaluate_core, load_bundle
from nanochat.dataloader import PackedTokenLoader, split_shards
from nanochat.demo_data import read_manifest
from nanochat.engine import Engine, batch_decode_path
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_loading import find_checkpoint, load_model, model_files
from nanochat.paths import base_dir, data_dir, tokenizer_dir
from nanochat.report import already_evaluated, evaluation_inputs, write_section
from nanochat.runtime import print0, setup_runtime, teardown_runtime, torchrun_ranks
from nanochat.tokenizer import load_token_bytes

EVAL_BUNDLE_DIR = "eval_bundle"
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The capital of",
    "If yesterday was Friday, then tomorrow will be",
    "12 plus 7 is",
    "Once upon a time",
)
SAMPLE_TOKENS = 16


@dataclass
class BaseEvalConfig:
    """Bits per byte, greedy samples and CORE of a base-model checkpoint."""

    model_tag: str | None = field(default=None, metadata={"help": "checkpoint tag (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    device_batch_size: int = field(default=32, metadata={"help": "sequences per forward pass"})
    split_tokens: int = field(default=10 * 524288, metadata={"help": "tokens per split for bits per byte"})
    max_per_task: int = field(default=-1, metadata={"help": "CORE examples per task (-1: all)"})
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    tokenizer_threads: int = 4
    force: bool = field(default=False, metadata={
        "help": "evaluate again even if the report holds the results for this checkpoint, data and settings"})

    def __post_init__(self) -> None:
        for name in ("device_batch_size", "split_tokens", "tokenizer_threads"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.max_per_task == -1 or self.max_per_task > 0, "--max-per-task must be positive or -1 (all)")
        require(self.step is None or self.step >= 0, "--step must be zero or positive")
        require(self.device_type in ("auto", "cuda", "mps", "cpu"), "--device-type must be auto, cuda, mps or cpu")


def _core_bundle(root: Path) -> Path | None:
    """The eval bundle to use, or None on the demo corpus (which has none); checked before any work."""
    bundle = root / EVAL_BUNDLE_DIR
    if not bundle.is_dir():
        if read_manifest(root) is not None:
            return None
        raise UsageError(f"no CORE eval bundle in {bundle}: fetch it with `bash scripts/download_data.sh`")
    load_bundle(bundle)
    return bundle


def main(config: BaseEvalConfig) -> int:
    started = time.time()
    root = base_dir()
    bundle = _core_bundle(root)
    train_files, val_files = split_shards(data_dir(root), "train"), split_shards(data_dir(root), "val")
    tag, step, directory = find_checkpoint("base", config.model_tag, config.step)
    load_token_bytes(tokenizer_dir(root))
    inputs = evaluation_inputs(config, [*model_files(directory, step, root), *train_files, *val_files,
                                        *([bundle] if bundle is not None else [])], checkpoint=f"{tag} step {step}",
                               processes=torchrun_ranks(os.environ)[2])  # ranks split the documents
    if not config.force and already_evaluated("base_eval", inputs, f"{tag} step {step} with these settings", root):
        return EXIT_OK
    try:
        runtime = setup_runtime(config.device_type, precision=config.precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return _evaluate(config, runtime, root, bundle, train_files, val_files, started, inputs)
    finally:
        teardown_runtime(runtime)


def _evaluate(config, runtime, root, bundle, train_files, val_files, started, inputs) -> int:
    loaded = load_model("base", runtime.device, config.model_tag, config.step)
    model, tokenizer = loaded.model, loaded.tokenizer
    print0(runtime, f"base_eval: {loaded.directory} step {loaded.step}")
    token_bytes = load_token_bytes(tokenizer_dir(root)).to(runtime.device)
    B, T = config.device_batch_size, model.config.sequence_len
    steps = max(1, config.split_tokens // (B * T * runtime.world_size))
    bpb = {}
    for split, files in (("train", train_files), ("val", val_files)):
        loader = PackedTokenLoader(files, tokenizer, B, T, rank=runtime.rank, world_size=runtime.world_size,
                                   device=runtime.device, tokenizer_threads=config.tokenizer_threads)
        with loader:
            bpb[split] = evaluate_bpb(model, itertools.islice(loader, steps), token_bytes,
                                      autocast=runtime.autocast(), distributed=runtime.distributed)
        print0(runtime, f"{split} bpb: {bpb[split]:.4f} ({steps * B * T * runtime.world_size:,} tokens)")

    samples = []
    if runtime.is_master:
        engine = Engine(model, tokenizer, decode=batch_decode_path(runtime.device))
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
            answers, _ = engine.generate_batch(ids, num_samples=1, max_tokens=SAMPLE_TOKENS, temperature=0.0)
            samples.append(prompt + tokenizer.decode(answers[0]))
            print0(runtime, f"sample | {samples[-1]!r}")

    core = None
    if bundle is None:
        print0(runtime, f"CORE: skipped, the demo corpus has no eval bundle ({root / EVAL_BUNDLE_DIR})")
    else:
        core = evaluate_core(
            model, tokenizer, bundle, runtime.device, max_per_task=config.max_per_task, batch_size=B,
            max_seq_len=T, rank=runtime.rank, world_size=runtime.world_size, autocast=runtime.autocast,
            show_progress=runtime.is_master and sys.stderr.isatty(),
            on_task=lambda task, acc, centered: print0(
                runtime, f"CORE | {task.label:<36} accuracy {acc:.4f} | centered {centered:+.4f}"))
        print0(runtime, f"CORE metric: {core.core:.4f}")

    if runtime.is_master:
        section = {
            "settings": inputs["settings"],
            "inputs": inputs,
            "phase": "BASE",
            "model_tag": loaded.tag,
            "step": loaded.step,
            "train_bpb": bpb["train"],
            "val_bpb": bpb["val"],
            "bpb_tokens_per_split": steps * B * T * runtime.world_size,
            "samples": samples,
            "seconds": time.time() - started,
        }
        if core is None:
            section["core"] = "skipped: no eval bundle (demo corpus)"
        else:
            section["metrics"] = {"CORE": core.core}
            section["core_tasks"] = [f"{label}: accuracy {core.accuracy[label]:.4f}, centered "
                                     f"{core.centered[label]:+.4f} ({core.examples[label]} examples)"
                                     for label in core.accuracy]
        write_section("base_eval", section, root=root)
    return EXIT_OK


def cli(argv=None) -> int:
    return run_stage(main, BaseEvalConfig, argv, prog="python -m scripts.base_eval")


if __name__ == "__main__":
    sys.exit(cli())
