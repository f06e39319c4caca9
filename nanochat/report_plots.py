"""PNG plots for report.md: training loss and validation bits-per-byte per training stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(sections: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per kind of curve found in the sections; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title, ylabel, filename in (
        ("loss_history", "Training loss", "loss (nats/token)", "train_loss.png"),
        ("val_history", "Validation bits per byte", "bits per byte", "val_bpb.png"),
        ("reward_history", "RL mean reward", "mean reward", "rl_reward.png"),
        ("gsm8k_history", "RL GSM8K pass@1", "pass@1", "rl_gsm8k.png"),
    ):
        curves = {name: s[key] for name, s in sections.items() if s.get(key)}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for name, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                    marker="o" if key == "val_history" else None, markersize=3)
        if key == "val_history":
            baselines = [(p[0], p[2]) for s in curves.values() for p in s if len(p) > 2]
            if baselines:
                ax.axhline(baselines[-1][1], color="grey", linestyle="--", label="unigram baseline")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(out_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
