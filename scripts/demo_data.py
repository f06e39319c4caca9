"""Stage: write the built-in demo corpus (an invented world of facts and sums) into the cache.

Pretraining shards go to `base_data/` (the last shard is validation), task files in the real datasets'
shapes to `tasks/`, and the `DEMO` manifest last. Same settings, same bytes; an existing corpus with the same
settings makes this a no-op, one with other settings needs --force. It refuses to overwrite parquet shards
that are not a demo corpus (real data) unless --force. Temporary files a killed run left are removed first.

    python -m scripts.demo_data [--seed 0 --pretrain-megabytes 3.0 --num-shards 4 ... --force]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from nanochat.configargs import run_stage
from nanochat.demo_data import (
    DemoCorpusConfig,
    corpus_config_dict,
    corpus_status,
    remove_leftovers_of_killed_runs,
    write_demo_corpus,
)
from nanochat.paths import base_dir
from nanochat.report import write_section


@dataclass
class DemoDataConfig(DemoCorpusConfig):
    """Write the built-in demo corpus (pretraining shards, task files, DEMO manifest) into the cache."""

    force: bool = field(default=False, metadata={"help": "rewrite even if a demo corpus is already there"})


def main(config: DemoDataConfig) -> int:
    root = base_dir()
    for leftover in remove_leftovers_of_killed_runs(root):
        print(f"removed {leftover}: left by a killed run")
    corpus = DemoCorpusConfig(**corpus_config_dict(config))
    status = corpus_status(root, corpus)
    start = time.perf_counter()
    manifest = write_demo_corpus(root, corpus, force=config.force, show_progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    generated = config.force or status != "current"

    files = manifest["files"]
    shard_rows = sum(info["rows"] for name, info in files.items() if name.startswith("base_data/"))
    task_rows = sum(info["rows"] for name, info in files.items() if name.startswith("tasks/"))
    verb = f"wrote in {seconds:.1f}s" if generated else "already present (pass --force to rewrite)"
    print(f"demo corpus {verb}: {manifest['pretrain_text_bytes'] / 1e6:.2f} MB of text in {shard_rows:,} "
          f"documents over {corpus.num_shards} shards (last = val), {task_rows:,} task rows in "
          f"{sum(n.startswith('tasks/') for n in files)} files, {len(manifest['heldout'])} held-out names "
          f"-> {root}")
    write_section("demo_data", {
        "generated": generated,
        "seconds": round(seconds, 2),
        "config": manifest["config"],
        "pretrain_text_bytes": manifest["pretrain_text_bytes"],
        "documents": shard_rows,
        "task_rows": {name.removeprefix("tasks/"): info["rows"] for name, info in files.items()
                      if name.startswith("tasks/")},
        "heldout_names": len(manifest["heldout"]),
        "heldout_sums": manifest["heldout_sums"],
    })
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, DemoDataConfig, argv, prog="python -m scripts.demo_data")


if __name__ == "__main__":
    sys.exit(cli())
