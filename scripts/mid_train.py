"""Midtraining: `python -m scripts.mid_train`, teaching the base model the chat format, multiple choice and tool use.

Starts from the latest base checkpoint (`--model-tag`, `--step` pick another) and trains on a shuffled
mixture of SmolTalk conversations, MMLU auxiliary_train multiple-choice questions, GSM8K solutions whose
calculations are python tool calls, and identity conversations, packed best-fit into full rows like
pretraining; the loss covers only the tokens the assistant writes. Validation: bits per byte on the
assistant tokens of the SmolTalk, MMLU and GSM8K test splits. Writes mid_checkpoints/<tag>/; resumes by
itself, saves and exits 75 on a stop signal, exits 3 on a non-finite loss.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from nanochat.chat_data import PackedChatLoader, mean_rendered_length
from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.paths import checkpoint_dir, tokenizer_dir
from nanochat.runtime import print0, print0_before_setup, setup_runtime, teardown_runtime
from nanochat.tasks import GSM8K, MMLU, Identity, SmolTalk, TaskMixture, require_available
from nanochat.tokenizer import Tokenizer
from nanochat.training_loop import (
    FinetuneConfig,
    FinetuneJob,
    check_sequence_length,
    finished_step,
    first_batches,
    resolve_source,
    run_finetune,
    source_model_config,
)


@dataclass
class MidTrainConfig(FinetuneConfig):
    """Midtrain the base model on chat, multiple-choice, tool-use and identity conversations."""

    total_batch_size: int | None = field(default=None, metadata={
        "help": "tokens per optimizer step over all devices (default: one micro-batch per device)"})
    smoltalk_limit: int | None = field(default=None, metadata={"help": "use only the first N SmolTalk conversations"})
    mmlu_epochs: int = field(default=1, metadata={"help": "passes over MMLU auxiliary_train"})
    gsm8k_epochs: int = field(default=1, metadata={"help": "passes over GSM8K train"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.total_batch_size is None or self.total_batch_size > 0, "--total-batch-size must be positive")
        require(self.smoltalk_limit is None or self.smoltalk_limit >= 0, "--smoltalk-limit must be 0 or more")
        require(self.mmlu_epochs >= 0 and self.gsm8k_epochs >= 0, "--mmlu-epochs and --gsm8k-epochs must be 0 or more")


def build_mixtures(config: MidTrainConfig) -> tuple[TaskMixture, TaskMixture]:
    """(training mixture, validation mixture)."""
    train = ([SmolTalk("train", limit=config.smoltalk_limit)] + [MMLU("auxiliary_train")] * config.mmlu_epochs
             + [GSM8K("train")] * config.gsm8k_epochs + [Identity(path=config.identity_file)] * config.identity_epochs)
    val = [SmolTalk("test"), MMLU("test"), GSM8K("test")]
    return TaskMixture(train, seed=config.mixture_seed), TaskMixture(val, seed=config.mixture_seed)


def main(config: MidTrainConfig) -> int:
    source = resolve_source("base", config)
    out_dir = checkpoint_dir("mid", source.tag)
    done = finished_step(out_dir)
    if done is not None and not config.force:
        print0_before_setup(f"mid_train: {out_dir} already holds the finished run (step {done}); nothing to do "
                            "(--force trains again)")
        return EXIT_OK
    tokenizer = Tokenizer.load(tokenizer_dir())
    model_config = source_model_config(source)
    seq_len = check_sequence_length(config, model_config)
    train_mix, val_mix = build_mixtures(config)
    require_available([train_mix, val_mix])
    require(len(train_mix) > 0, "the training mixture is empty: raise the per-source counts or epochs")
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed, precision=config.precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        B, world = config.device_batch_size, runtime.world_size
        micro_tokens = B * seq_len * world
        total = config.total_batch_size or micro_tokens
        require(total % micro_tokens == 0,
                f"--total-batch-size {total} must be a multiple of device batch x sequence x processes = {micro_tokens}")
        num_iterations = config.num_iterations
        if num_iterations == -1:
            mean_length = mean_rendered_length(train_mix, tokenizer, seq_len)
            num_iterations = max(1, math.ceil(len(train_mix) * mean_length / total))
            print0(runtime, f"one pass over {len(train_mix):,} conversations (about {mean_length:.0f} tokens each) "
                            f"is about {num_iterations} steps of {total:,} tokens")
        loader_args = dict(rank=runtime.rank, world_size=world, device=runtime.device)
        job = FinetuneJob(
            stage="mid_train", phase="mid", report_phase="MID", config=config, source=source,
            model_config=model_config, num_iterations=num_iterations, grad_accum_steps=total // micro_tokens,
            make_feed=lambda state: PackedChatLoader(train_mix, tokenizer, B, seq_len, state=state, **loader_args),
            val_batches=lambda: first_batches(PackedChatLoader(val_mix, tokenizer, B, seq_len, **loader_args),
                                              config.eval_batches),
            dynamic_shapes=False,
            run_settings={"max_seq_len": seq_len, "total_batch_size": total, "smoltalk_limit": config.smoltalk_limit,
                          "mmlu_epochs": config.mmlu_epochs, "gsm8k_epochs": config.gsm8k_epochs},
            report_extras={"train_conversations": len(train_mix), "max_seq_len": seq_len,
                           "total_batch_size": total},
        )
        return run_finetune(job, runtime)
    finally:
        teardown_runtime(runtime)


def cli(argv=None) -> int:
    return run_stage(main, MidTrainConfig, argv, prog="python -m scripts.mid_train")


if __name__ == "__main__":
    sys.exit(cli())
