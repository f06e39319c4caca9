"""Evaluate a chat checkpoint on tasks: `python -m scripts.chat_eval --source sft [--tasks ARC-Easy,GSM8K]`.

Multiple-choice tasks (ARC-Easy, ARC-Challenge, MMLU) compare the logits of the answer letters; GSM8K
(with the calculator tool) and HumanEval (run in the sandbox) generate answers with the Engine. On the demo
corpus the same task names read the demo files, and DemoFacts adds exact-match questions about held-out
entities. ChatCORE is the mean centered accuracy over the standard tasks evaluated. Writes report section
`chat_eval_<source>` (phase MID, SFT or RL); running it again on the same checkpoint and settings does
nothing (`--force` evaluates again). Under torchrun the examples are split across ranks.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from nanochat.chat_eval_runner import DEMO_FACTS, STANDARD_TASKS, build_task, chatcore, evaluate_task
from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.model_loading import find_checkpoint, load_model, model_files
from nanochat.paths import base_dir
from nanochat.report import already_evaluated, evaluation_inputs, write_section
from nanochat.runtime import print0, setup_runtime, teardown_runtime
from nanochat.tasks import is_demo_cache, require_available

CHECKPOINT_PHASE = {"mid": "mid", "sft": "chatsft", "rl": "chatrl"}
REPORT_PHASE = {"mid": "MID", "sft": "SFT", "rl": "RL"}


@dataclass
class ChatEvalConfig:
    """Accuracy of a chat checkpoint on multiple-choice and generative tasks, and ChatCORE."""

    source: Literal["mid", "sft", "rl"] = field(default="sft", metadata={"help": "which stage's checkpoint"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated tasks (default: all standard tasks, plus DemoFacts on the demo corpus)"})
    max_per_task: int = field(default=-1, metadata={"help": "examples per task, a fixed random subset (-1: all)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature for generated answers"})
    top_k: int | None = field(default=50, metadata={"help": "sample among the k most likely tokens"})
    num_samples: int = field(default=1, metadata={"help": "answers per generative example (pass@k)"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest generated answer"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass for multiple choice"})
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint tag (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    force: bool = field(default=False, metadata={
        "help": "evaluate again even if the report holds the results for this checkpoint and settings"})

    def __post_init__(self) -> None:
        require(self.max_per_task == -1 or self.max_per_task > 0, "--max-per-task must be positive or -1 (all)")
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                f"--temperature must be a finite number >= 0, got {self.temperature}")
        require(self.top_k is None or self.top_k > 0, "--top-k must be positive (or none)")
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.device_type in ("auto", "cuda", "mps", "cpu"), "--device-type must be auto, cuda, mps or cpu")
        if self.tasks is not None:
            names = [n.strip() for n in self.tasks.split(",") if n.strip()]
            require(bool(names), "--tasks must name at least one task")
            unknown = [n for n in names if n not in STANDARD_TASKS and n != DEMO_FACTS]
            require(not unknown, f"unknown task(s) {', '.join(unknown)} in --tasks; choose from "
                                 f"{', '.join([*STANDARD_TASKS, DEMO_FACTS])}")

    def task_names(self, demo: bool) -> list[str]:
        if self.tasks is not None:
            return [n.strip() for n in self.tasks.split(",") if n.strip()]
        return [*STANDARD_TASKS, *([DEMO_FACTS] if demo else [])]


def main(config: ChatEvalConfig) -> int:
    started = time.time()
    root = base_dir()
    phase = CHECKPOINT_PHASE[config.source]
    tag, step, directory = find_checkpoint(phase, config.model_tag, config.step)  # before any dataset fetch
    names = config.task_names(is_demo_cache(root))
    tasks = {name: build_task(name, root) for name in names}
    require_available(tasks.values())
    stage = f"chat_eval_{config.source}"
    task_files = [path for task in tasks.values() for path in task.source.files()]
    inputs = evaluation_inputs(config, [*model_files(directory, step, root), *task_files],
                               tasks={name: task.source.description for name, task in tasks.items()},
                               checkpoint=f"{phase} {tag} step {step}")
    if not config.force and already_evaluated(stage, inputs, f"{phase} {tag} step {step} with these settings", root):
        return EXIT_OK
    try:
        runtime = setup_runtime(config.device_type, precision=config.precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        loaded = load_model(phase, runtime.device, config.model_tag, config.step)
        print0(runtime, f"chat_eval: {loaded.directory} step {loaded.step}")
        scores = []
        for name, task in tasks.items():
            t0 = time.time()
            score = evaluate_task(
                name, task, loaded.model, loaded.tokenizer, runtime.device, max_per_task=config.max_per_task,
                batch_size=config.batch_size, num_samples=config.num_samples,
                max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                rank=runtime.rank, world_size=runtime.world_size, autocast=runtime.autocast,
                show_progress=runtime.is_master and sys.stderr.isatty())
            scores.append(score)
            print0(runtime, f"{name:<14} accuracy {score.accuracy:.4f} ({score.correct}/{score.total}) | centered "
                            f"{score.centered:+.4f} | {time.time() - t0:.1f} s")
            for sample in score.samples:
                print0(runtime, f"  sample | {sample}")
        core = chatcore(scores)
        if core is not None:
            print0(runtime, f"ChatCORE: {core:.4f}")
        if runtime.is_master:
            metrics = {s.name: s.accuracy for s in scores}
            if core is not None:
                metrics["ChatCORE"] = core
            write_section(stage, {
                "settings": inputs["settings"],
                "inputs": inputs,
                "phase": REPORT_PHASE[config.source],
                "metrics": metrics,
                "model_tag": loaded.tag,
                "step": loaded.step,
                "tasks": [f"{s.name}: {s.correct}/{s.total} correct, centered {s.centered:+.4f}" for s in scores],
                "samples": [f"{s.name}: {sample}" for s in scores for sample in s.samples],
                "seconds": time.time() - started,
            }, root=root)
    finally:
        teardown_runtime(runtime)
    return EXIT_OK


def cli(argv=None) -> int:
    return run_stage(main, ChatEvalConfig, argv, prog="python -m scripts.chat_eval")


if __name__ == "__main__":
    sys.exit(cli())
