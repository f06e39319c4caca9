"""Supervised fine-tuning: `python -m scripts.chat_sft`, turning the midtrained model into a chat assistant.

Starts from the latest mid checkpoint (`--source base` skips midtraining; `--model-tag`, `--step` pick
another) and trains on a shuffled mixture of SmolTalk, ARC-Easy and ARC-Challenge train, GSM8K train and
identity conversations, one conversation per row padded to the longest in the batch, with the loss on the
assistant's tokens only. `--pretrain-mix` turns that share of every batch's rows into pretraining text
(trained on every token): on the demo corpus plain SFT made the model forget pretraining facts and a 50% mix
kept them. Validation: bits per byte on the assistant tokens of SmolTalk test. Writes
chatsft_checkpoints/<tag>/; resumes by itself, saves and exits 75 on a stop signal, exits 3 on a non-finite loss.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from nanochat.chat_data import MixedBatches, PaddedChatLoader
from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.dataloader import PackedTokenLoader, split_shards
from nanochat.paths import checkpoint_dir, data_dir, tokenizer_dir
from nanochat.runtime import print0_before_setup, setup_runtime, teardown_runtime
from nanochat.tasks import GSM8K, ARCChallenge, ARCEasy, Identity, SmolTalk, TaskMixture, require_available
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
class ChatSFTConfig(FinetuneConfig):
    """Fine-tune on conversations (assistant tokens only), mixed with pretraining text."""

    source: Literal["mid", "base"] = field(default="mid", metadata={"help": "checkpoint phase to start from"})
    examples_per_step: int | None = field(default=None, metadata={
        "help": "conversations per optimizer step over all devices (default: one micro-batch per device)"})
    pretrain_mix: float = field(default=0.5, metadata={"help": "share of each batch's rows that is pretraining text"})
    smoltalk_limit: int | None = field(default=None, metadata={"help": "use only the first N SmolTalk conversations"})
    arc_epochs: int = field(default=1, metadata={"help": "passes over ARC-Easy and ARC-Challenge train"})
    gsm8k_epochs: int = field(default=1, metadata={"help": "passes over GSM8K train"})
    tokenizer_threads: int = field(default=4, metadata={"help": "threads tokenizing the pretraining text"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.pretrain_mix < 1, f"--pretrain-mix must be in [0, 1), got {self.pretrain_mix}")
        require(self.examples_per_step is None or self.examples_per_step > 0, "--examples-per-step must be positive")
        require(self.smoltalk_limit is None or self.smoltalk_limit >= 0, "--smoltalk-limit must be 0 or more")
        require(self.arc_epochs >= 0 and self.gsm8k_epochs >= 0, "--arc-epochs and --gsm8k-epochs must be 0 or more")
        require(self.tokenizer_threads > 0, "--tokenizer-threads must be positive")

    @property
    def text_rows(self) -> int:
        return round(self.device_batch_size * self.pretrain_mix)


def build_mixture(config: ChatSFTConfig) -> TaskMixture:
    tasks = ([SmolTalk("train", limit=config.smoltalk_limit)]
             + [ARCEasy("train"), ARCChallenge("train")] * config.arc_epochs + [GSM8K("train")] * config.gsm8k_epochs
             + [Identity(path=config.identity_file)] * config.identity_epochs)
    return TaskMixture(tasks, seed=config.mixture_seed)


def main(config: ChatSFTConfig) -> int:
    source = resolve_source(config.source, config)
    out_dir = checkpoint_dir("chatsft", source.tag)
    done = finished_step(out_dir)
    if done is not None and not config.force:
        print0_before_setup(f"chat_sft: {out_dir} already holds the finished run (step {done}); nothing to do "
                            "(--force trains again)")
        return EXIT_OK
    text_rows = config.text_rows
    chat_rows = config.device_batch_size - text_rows
    require(chat_rows >= 1 and (config.pretrain_mix == 0 or text_rows >= 1),
            f"--device-batch-size {config.device_batch_size} cannot hold a {config.pretrain_mix} share of text rows "
            "and at least one conversation; raise --device-batch-size or change --pretrain-mix")
    tokenizer = Tokenizer.load(tokenizer_dir())
    model_config = source_model_config(source)
    seq_len = check_sequence_length(config, model_config)
    train_shards = split_shards(data_dir(), "train") if text_rows else []
    train_mix, val_task = build_mixture(config), SmolTalk("test")
    require_available([train_mix, val_task])
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed, precision=config.precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        world = runtime.world_size
        per_micro_step = chat_rows * world
        examples_per_step = config.examples_per_step or per_micro_step
        require(examples_per_step % per_micro_step == 0,
                f"--examples-per-step {examples_per_step} must be a multiple of the conversations per micro-step "
                f"over all processes ({chat_rows} x {world} = {per_micro_step})")
        num_iterations = config.num_iterations
        if num_iterations == -1:
            num_iterations = len(train_mix) // examples_per_step
            require(num_iterations > 0, f"one pass over {len(train_mix)} conversations is less than one step of "
                                        f"{examples_per_step}; lower --examples-per-step or add data")
        loader_args = dict(rank=runtime.rank, world_size=world, device=runtime.device)

        def make_feed(state):
            chat = PaddedChatLoader(train_mix, tokenizer, chat_rows, seq_len,
                                    state=state["chat"] if state else None, **loader_args)
            text = None
            if text_rows:
                text = PackedTokenLoader(train_shards, tokenizer, text_rows, seq_len,
                                         tokenizer_threads=config.tokenizer_threads,
                                         state=state["pretrain"] if state else None, **loader_args)
            return MixedBatches(chat, text)

        job = FinetuneJob(
            stage="chat_sft", phase="chatsft", report_phase="SFT", config=config, source=source,
            model_config=model_config, num_iterations=num_iterations,
            grad_accum_steps=examples_per_step // per_micro_step, make_feed=make_feed,
            val_batches=lambda: first_batches(PaddedChatLoader(val_task, tokenizer, config.device_batch_size,
                                                               seq_len, **loader_args), config.eval_batches),
            dynamic_shapes=True,
            run_settings={"max_seq_len": seq_len, "examples_per_step": examples_per_step,
                          "pretrain_mix": config.pretrain_mix, "smoltalk_limit": config.smoltalk_limit,
                          "arc_epochs": config.arc_epochs, "gsm8k_epochs": config.gsm8k_epochs},
            report_extras={"train_conversations": len(train_mix), "max_seq_len": seq_len,
                           "examples_per_step": examples_per_step, "text_rows_per_batch": text_rows},
        )
        return run_finetune(job, runtime)
    finally:
        teardown_runtime(runtime)


def cli(argv=None) -> int:
    return run_stage(main, ChatSFTConfig, argv, prog="python -m scripts.chat_sft")


if __name__ == "__main__":
    sys.exit(cli())
