"""Stage: measure the tokenizer's compression (UTF-8 bytes per token) on the data and on fixed snippets.

Rows: a sample of the training shards, a sample of the validation shard, and built-in snippets of prose,
code, math and non-English text. Higher bytes per token means shorter sequences for the same text.
Running it again with the same settings, tokenizer and shards does nothing (`--force` measures again).

    python -m scripts.tok_eval [--sample-chars 5000000]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from nanochat.configargs import EXIT_OK, require, run_stage
from nanochat.dataloader import split_shards
from nanochat.paths import data_dir, tokenizer_dir
from nanochat.report import already_evaluated, evaluation_inputs, write_section
from nanochat.tokenizer import Tokenizer, iter_parquet_texts

SNIPPETS = {
    "prose": (
        "The lighthouse keeper climbed the spiral stairs every evening, counting the steps out of habit. "
        "On the night of the storm the lamp flickered twice, and she wondered whether the ships beyond the "
        "reef could still see it through the rain."
    ),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        "Solve 3x + 7 = 25: subtract 7 to get 3x = 18, so x = 6. The area of a circle of radius 4 is "
        "16π ≈ 50.27, and ∫₀¹ x² dx = 1/3. Check: 1234 + 5678 = 6912, 99 × 101 = 9999."
    ),
    "non-english": (
        "Der schnelle Zug nach München fährt um 14:35 ab. Le café est fermé le dimanche, désolé ! "
        "今日はとても良い天気ですね。 Сегодня мы идём в библиотеку. 오늘 저녁에 만나요."
    ),
}


@dataclass
class TokEvalConfig:
    """Report the tokenizer's bytes per token on train, validation and built-in text."""

    sample_chars: int = field(default=5_000_000,
                              metadata={"help": "characters read from the train and from the validation split"})
    batch_docs: int = field(default=1024, metadata={"help": "documents encoded per batch"})
    force: bool = field(default=False, metadata={
        "help": "evaluate again even if the report holds the results for this tokenizer, data and settings"})

    def __post_init__(self) -> None:
        require(self.sample_chars > 0, "--sample-chars must be positive")
        require(self.batch_docs > 0, "--batch-docs must be positive")


def _measure(tokenizer: Tokenizer, texts: Iterable[str], batch_docs: int, desc: str) -> dict[str, float]:
    """UTF-8 bytes, tokens and bytes per token over all texts, encoded a batch at a time."""
    n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode(batch))
        batch.clear()

    for text in tqdm(texts, desc=desc, unit="doc", disable=not sys.stderr.isatty()):
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == batch_docs:
            flush()
    flush()
    ratio = n_bytes / n_tokens if n_tokens else 0.0
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(ratio, 3)}


def main(config: TokEvalConfig) -> int:
    start = time.perf_counter()
    tokenizer = Tokenizer.load(tokenizer_dir())
    train_shards, (val_shard,) = split_shards(data_dir(), "train"), split_shards(data_dir(), "val")
    inputs = evaluation_inputs(config, [*tokenizer_dir().iterdir(), *train_shards, val_shard])
    if not config.force and already_evaluated("tok_eval", inputs, "this tokenizer, data and settings"):
        return EXIT_OK
    rows = {
        "train": _measure(tokenizer, iter_parquet_texts(train_shards, config.sample_chars), config.batch_docs,
                          "train"),
        "val": _measure(tokenizer, iter_parquet_texts([val_shard], config.sample_chars), config.batch_docs,
                        "val"),
    }
    for name, text in SNIPPETS.items():
        rows[name] = _measure(tokenizer, [text], config.batch_docs, name)

    print(f"tokenizer vocab {tokenizer.vocab_size}: UTF-8 bytes per token")
    print(f"{'text':<12} {'bytes':>12} {'tokens':>12} {'bytes/token':>12}")
    for name, row in rows.items():
        print(f"{name:<12} {row['bytes']:>12,} {row['tokens']:>12,} {row['bytes_per_token']:>12.3f}")
    write_section("tok_eval", {"settings": inputs["settings"], "inputs": inputs, "seconds": round(time.perf_counter() - start, 2),
                               "vocab_size": tokenizer.vocab_size, "compression": rows})
    return EXIT_OK


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, TokEvalConfig, argv, prog="python -m scripts.tok_eval")


if __name__ == "__main__":
    sys.exit(cli())
