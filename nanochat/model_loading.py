"""Load a trained model from a phase's checkpoints (base, mid, chatsft, chatrl) for the next stage.

A checkpoint's meta carries the model config, so the model is rebuilt exactly; the tokenizer comes from
the cache. A missing checkpoint is a UsageError naming the stage that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint as ckpt
from nanochat.configargs import UsageError
from nanochat.gpt import GPT, GPTConfig
from nanochat.paths import checkpoint_dir, phase_dir, tokenizer_dir
from nanochat.tokenizer import Tokenizer

PRODUCING_STAGE = {"base": "base_train", "mid": "mid_train", "chatsft": "chat_sft", "chatrl": "chat_rl"}


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    meta: dict
    phase: str
    tag: str
    step: int
    directory: Path


def find_checkpoint(phase: str, tag: str | None = None, step: int | None = None,
                    root: Path | None = None) -> tuple[str, int, Path]:
    """(tag, step, directory) of the requested checkpoint; tag defaults to the most recently written one and
    step to its latest complete checkpoint."""
    tags = phase_dir(phase, root)
    fix = f"run `python -m scripts.{PRODUCING_STAGE[phase]}` first"
    tag = tag or ckpt.latest_tag(tags)
    if tag is None:
        raise UsageError(f"no {phase} checkpoint in {tags}: {fix}")
    directory = checkpoint_dir(phase, tag, root)
    steps = ckpt.complete_steps(directory)
    if not steps:
        raise UsageError(f"no complete {phase} checkpoint in {directory}: {fix}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UsageError(f"no complete checkpoint at step {step} in {directory}; available: {steps}")
    return tag, step, directory


def model_files(directory: Path, step: int, root: Path | None = None) -> list[Path]:
    """The files a loaded model comes from: the checkpoint's weights and meta, and the cache's tokenizer."""
    return [ckpt.model_path(directory, step), ckpt.meta_path(directory, step),
            *sorted(tokenizer_dir(root).iterdir())]


def load_model(phase: str, device: torch.device | str, tag: str | None = None, step: int | None = None,
               root: Path | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild the model of a checkpoint in eval mode on `device`, with the cache's tokenizer; `dtype` casts
    the weights (bf16 for serving on a GPU: half the bytes read per decoded token)."""
    tag, step, directory = find_checkpoint(phase, tag, step, root)
    model_state, _, meta = ckpt.load_checkpoint(directory, step, device, load_optimizer=False)
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(model_state)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tokenizer = Tokenizer.load(tokenizer_dir(root))
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"the tokenizer in {tokenizer_dir(root)} has {tokenizer.vocab_size} tokens but the "
                         f"checkpoint expects {config.vocab_size}: retrain the model or restore its tokenizer")
    return LoadedModel(model, tokenizer, meta, phase, tag, step, directory)
