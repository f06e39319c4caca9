"""Stage: train the BPE tokenizer on the training shards and save it into the cache.

Reads the `text` column of every shard but the last (the validation shard), streaming row groups, each
document cut to --doc-cap characters, until --max-chars characters. Writes tokenizer.json and
token_bytes.pt into `tokenizer/` through a temporary folder that is renamed into place; a run first
removes such folders left by a killed one (`nanochat.leftovers`). An existing tokenizer with the same
vocabulary size makes this a no-op unless --force.

    python -m scripts.tok_train [--vocab-size 32768 --max-chars 2000000000 --doc-cap 10000 --force]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat.configargs import UsageError, config_to_dict, require, run_stage
from nanochat.dataloader import split_shards
from nanochat.leftovers import remove_leftovers, temp_name
from nanochat.paths import data_dir, tokenizer_dir
from nanochat.report import write_section
from nanochat.tokenizer import (
    MIN_VOCAB_SIZE,
    TOKEN_BYTES_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    iter_parquet_texts,
    train_tokenizer,
)

ROUND_TRIP_SAMPLE = "Tokenizers split text: 'Hello, world!' costs 12345 bytes; naïve café ☕ 🙂\n\tdef f(x): return x**2"


@dataclass
class TokTrainConfig:
    """Train the BPE tokenizer on the training shards."""

    vocab_size: int = field(default=32768, metadata={"help": "vocabulary size, special tokens included"})
    max_chars: int = field(default=2_000_000_000, metadata={"help": "stop reading after this many characters"})
    doc_cap: int = field(default=10_000, metadata={"help": "cut each document to this many characters"})
    force: bool = field(default=False, metadata={"help": "retrain even if a tokenizer exists"})

    def __post_init__(self) -> None:
        require(self.vocab_size >= MIN_VOCAB_SIZE,
                f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
        require(self.max_chars > 0, "--max-chars must be positive")
        require(self.doc_cap > 0, "--doc-cap must be positive")


class _CharCounter:
    """Counts documents and characters as they stream past, showing progress on a terminal."""

    def __init__(self) -> None:
        self.docs = 0
        self.chars = 0

    def count(self, texts: Iterable[str]) -> Iterator[str]:
        with tqdm(unit="char", unit_scale=True, desc="reading", disable=not sys.stderr.isatty()) as bar:
            for text in texts:
                self.docs += 1
                self.chars += len(text)
                bar.update(len(text))
                yield text


def _is_trained(directory: Path) -> bool:
    return (directory / TOKENIZER_FILE).is_file() and (directory / TOKEN_BYTES_FILE).is_file()


def _install(tokenizer: Tokenizer, target: Path) -> None:
    """Write both files into a temporary sibling folder, then rename it over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / temp_name(target.name)
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save(staging)
    torch.save(tokenizer.token_bytes(), staging / TOKEN_BYTES_FILE)
    if target.exists():
        retired = target.parent / temp_name(target.name, "old")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)  # another run may be cleaning it up as a leftover
    else:
        os.replace(staging, target)


def main(config: TokTrainConfig) -> int:
    target = tokenizer_dir()
    removed = remove_leftovers(target.parent, target.name)
    if removed:
        print(f"removed {', '.join(removed)} from {target.parent}: left by a killed run")
    if _is_trained(target) and not config.force:
        existing = Tokenizer.load(target).vocab_size
        if existing == config.vocab_size:
            print(f"tokenizer already trained at {target} (vocab {existing}); pass --force to retrain")
            return 0
        raise UsageError(f"a tokenizer with vocab {existing} exists at {target}; pass --force to replace it "
                         f"with vocab {config.vocab_size} (models trained with the old one stop matching)")
    train_shards = split_shards(data_dir(), "train")

    counter = _CharCounter()
    texts = counter.count(iter_parquet_texts(train_shards, config.max_chars, config.doc_cap))
    start = time.perf_counter()
    try:
        tokenizer = train_tokenizer(texts, config.vocab_size, show_progress=sys.stderr.isatty())
    except ValueError as exc:
        raise UsageError(f"{exc} (read {counter.chars:,} characters from {len(train_shards)} shards)") from None
    seconds = time.perf_counter() - start

    ids = tokenizer.encode(ROUND_TRIP_SAMPLE)
    if tokenizer.decode(ids) != ROUND_TRIP_SAMPLE:
        raise RuntimeError("the trained tokenizer does not round-trip the sample text")
    token_bytes = tokenizer.token_bytes()
    ordinary = token_bytes[token_bytes > 0].float()
    # the section before the tokenizer: an installed tokenizer makes the rerun a no-op, so a kill between the
    # two must leave the tokenizer out (the rerun trains it again and writes both), never the section
    write_section("tok_train", {
        "settings": config_to_dict(config),
        "seconds": round(seconds, 2),
        "vocab_size": tokenizer.vocab_size,
        "train_shards": len(train_shards),
        "documents": counter.docs,
        "characters": counter.chars,
        "token_bytes_mean": round(ordinary.mean().item(), 3),
        "token_bytes_max": int(ordinary.max().item()),
        "sample_tokens": len(ids),
    })
    _install(tokenizer, target)
    print(f"trained vocab {tokenizer.vocab_size} on {counter.chars:,} characters ({counter.docs:,} documents "
          f"from {len(train_shards)} shards) in {seconds:.1f}s -> {target}")
    print(f"round trip: {len(ROUND_TRIP_SAMPLE.encode('utf-8'))} bytes -> {len(ids)} tokens -> identical text")
    print("pieces: " + " ".join(repr(tokenizer.token_to_bytes(i))[1:] for i in ids))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, TokTrainConfig, argv, prog="python -m scripts.tok_train")


if __name__ == "__main__":
    sys.exit(cli())
