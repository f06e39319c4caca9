"""Assemble report.md from every stage's report section: `python -m scripts.report`.

Writes `report/report.md` in the cache with the environment (git commit, GPUs, CPU, memory), the
BASE/MID/SFT/RL results table, PNG plots of the training and validation curves, and each stage's
settings and timings.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nanochat.configargs import require, run_stage
from nanochat.paths import base_dir, report_dir
from nanochat.report import atomic_write_text, read_sections, render_markdown
from nanochat.report_plots import plot_curves

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ReportConfig:
    """Write report.md from the report sections in the cache."""

    output: str | None = None

    def __post_init__(self) -> None:
        require(self.output is None or self.output.endswith(".md"), "--output must name a .md file")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment() -> dict[str, str]:
    import torch

    info = {"git commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "CPU": f"{platform.processor() or platform.machine()}, "
                                                   f"{os.cpu_count()} logical cores"}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        info["memory"] = "unknown"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["GPUs"] = f"{len(names)} x {names[0]}"
    else:
        info["GPUs"] = "none"
    info["cache"] = str(base_dir())
    return info


def main(config: ReportConfig) -> int:
    sections = read_sections()
    require(bool(sections), f"no report sections in {report_dir()}: run the pipeline's stages first "
                            "(e.g. `python -m launch --site cpu`)")
    out_path = Path(config.output) if config.output else report_dir() / "report.md"
    plots = plot_curves(sections, out_path.parent)
    atomic_write_text(out_path, render_markdown(sections, environment(), plots))
    print(f"report written to {out_path} ({len(sections)} stage sections, {len(plots)} plots)", flush=True)
    return 0


def cli(argv=None) -> int:
    return run_stage(main, ReportConfig, argv, prog="python -m scripts.report")


if __name__ == "__main__":
    sys.exit(cli())
