"""Shared fixtures: a tiny demo-corpus cache with a trained tokenizer, built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. The choice must be made before
# triton is first imported: its own library functions are decorated at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session-scoped SLURM test cluster)

REPO = Path(__file__).resolve().parents[1]


def run_stage(module: str, *args: str, cache: Path, timeout: float = 300, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m scripts.<module>` against `cache` the way a user would, capturing its output."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", f"scripts.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scripts.{module} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_cache_template(tmp_path_factory) -> Path:
    """A cache holding a small demo corpus and a 512-token tokenizer (built once; copy before writing)."""
    cache = tmp_path_factory.mktemp("tiny_cache")
    run_stage("demo_data", "--pretrain-megabytes", "0.3", "--num-shards", "3", cache=cache)
    run_stage("tok_train", "--vocab-size", "512", cache=cache)
    return cache


@pytest.fixture
def tiny_cache(tiny_cache_template, tmp_path) -> Path:
    """A private copy of the tiny cache that a test may write checkpoints and reports into."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache_template, cache)
    return cache
