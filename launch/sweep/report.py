"""`sweep-report`: the ranked table, the loss curves of the best candidates, and what the sweep cost.

Cost arithmetic: device-hours are the sum of every run's wall time (compilation, evaluation and failed
runs included) times the devices it held; times the price per device-hour. The projected target run is
its token budget at the winner's measured training throughput (tokens/s on one device of the sweep's
kind, so device-hours are the same on N devices if throughput scales linearly), times the same price.
Files written next to the trajectory: `<stem>.md` and `<stem>.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.sweep.campaign import phase1_ranking
from launch.sweep.trajectory import run_outcomes


@dataclass(frozen=True)
class CostEstimate:
    device_hours: float
    sweep_cost: float | None
    target_device_hours: float | None
    target_cost: float | None


def device_hours(events: Sequence[dict[str, Any]]) -> float:
    seconds = 0.0
    for e in events:
        if e.get("event") == "evaluated":
            seconds += e["metrics"].get("wall_seconds", 0.0) * e["metrics"].get("devices", 1)
        elif e.get("event") == "failed":
            seconds += e.get("wall_seconds", 0.0) * e.get("devices", 1)
    return seconds / 3600


def estimate_cost(events: Sequence[dict[str, Any]], winner: dict[str, Any] | None, price: float | None,
                  target_tokens: float | None) -> CostEstimate:
    used = device_hours(events)
    rate = (winner or {}).get("metrics", {}).get("tokens_per_second")
    target_hours = target_tokens / rate / 3600 if target_tokens and rate else None
    return CostEstimate(
        device_hours=used,
        sweep_cost=used * price if price is not None else None,
        target_device_hours=target_hours,
        target_cost=target_hours * price if target_hours is not None and price is not None else None,
    )


def phase2_ranking(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Phase-2 runs: non-diverged by val bpb first, then the diverged ones."""
    runs = [e for e in events if e.get("event") == "evaluated" and e.get("phase") == 2]
    return sorted(runs, key=lambda e: (e["metrics"].get("val_bpb") is None or bool(e["metrics"].get("diverged")),
                                       e["metrics"].get("val_bpb") or 0.0))


def _varying_knobs(runs: Sequence[dict[str, Any]]) -> list[str]:
    names = sorted({k for e in runs for k in e["knobs"]})
    return [n for n in names if len({repr(e["knobs"].get(n)) for e in runs}) > 1] or names


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ranked_table(runs: Sequence[dict[str, Any]]) -> str:
    names = _varying_knobs(runs)
    head = ["rank", "id", "steps", "val bpb", "tok/s", "peak MB", "wall s", *names, "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, e in enumerate(runs, 1):
        m = e["metrics"]
        notes = list(e.get("flags") or [])
        if m.get("diverged") and not notes:
            notes.append(m.get("divergence") or "diverged")
        cells = [str(rank), e["id"], str(e["steps"]), _number(m.get("val_bpb"), ".4f"),
                 _number(m.get("tokens_per_second"), ",.0f"), _number(m.get("peak_memory_mb"), ",.0f"),
                 _number(m.get("wall_seconds"), ".1f"), *(str(e["knobs"].get(n, "-")) for n in names),
                 "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(groups: dict[str, Sequence[dict[str, Any]]], path: Path) -> Path | None:
    """One panel per group (phase), a training-loss curve per run; None when no run has a loss history."""
    groups = {title: [e for e in runs if e["metrics"].get("loss_history")] for title, runs in groups.items()}
    groups = {title: runs for title, runs in groups.items() if runs}
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (title, runs) in zip(axes[0], groups.items(), strict=True):
        for e in runs:
            steps, losses = zip(*e["metrics"]["loss_history"], strict=True)
            label = f"{e['id']} ({_number(e['metrics'].get('val_bpb'), '.3f')} bpb)"
            ax.plot(steps, losses, label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(events: Sequence[dict[str, Any]], price: float | None, target_tokens: float | None,
           png_name: str | None) -> str:
    phase1 = phase1_ranking(events)
    diverged1 = [e for e in events if e.get("event") == "evaluated" and e.get("phase", 1) == 1
                 and (e["metrics"].get("diverged") or e["metrics"].get("val_bpb") is None)]
    phase2 = phase2_ranking(events)
    rejected = [e for e in events if e.get("event") == "rejected"]
    failed = [e for e in run_outcomes(events).values() if e.get("event") == "failed"]
    header = next((e for e in events if e.get("event") == "header" and e.get("phase") == 1), {})
    winners = [e for e in phase2 if not e["metrics"].get("diverged") and e["metrics"].get("val_bpb") is not None]
    winner = (winners or phase1 or [None])[0]
    cost = estimate_cost(events, winner, price, target_tokens)
    out = ["# Sweep report", "",
           f"site {header.get('site', '?')}, strategy {header.get('strategy', '?')}, {header.get('steps', '?')} "
           f"steps, seed {header.get('seed', '?')}, code {header.get('code_version', '?')}", "",
           f"## Phase 1: {len(phase1)} ranked, {len(diverged1)} diverged, {len(rejected)} rejected, "
           f"{len(failed)} failed", "", ranked_table(phase1 + diverged1) if phase1 or diverged1 else "(no runs)"]
    if phase2:
        out += ["", f"## Phase 2: {len(phase2)} finalists", "", ranked_table(phase2)]
    if rejected:
        out += ["", "## Rejected before running", ""]
        out += [f"- {e['id']} {e['knobs']}: {e['reason']}" for e in rejected]
    if failed:
        out += ["", "## Failed", ""]
        out += [f"- {e['id']} {e['knobs']}: exit {e['exit_status']}: {(e.get('log_tail') or ['?'])[-1]}"
                for e in failed]
    out += ["", "## Cost", "", f"- device-hours used by the sweep: {cost.device_hours:.4f}"]
    if cost.sweep_cost is not None:
        out.append(f"- at {price:g} per device-hour: {cost.sweep_cost:.2f}")
    else:
        out.append("- no price: pass --price-per-gpu-hour or set PRICE_PER_GPU_HOUR in .env.local")
    if winner is not None:
        rate = winner["metrics"].get("tokens_per_second")
        out.append(f"- winner {winner['id']} (phase {winner.get('phase', 1)}): {winner['knobs']}, val bpb "
                   f"{winner['metrics']['val_bpb']:.4f}, {_number(rate, ',.0f')} tokens/s")
    if cost.target_device_hours is not None:
        line = (f"- target run of {target_tokens:,.0f} tokens at the winner's rate: "
                f"{cost.target_device_hours:,.2f} device-hours")
        out.append(line + (f", {cost.target_cost:,.2f} at {price:g} per device-hour"
                           if cost.target_cost is not None else ""))
    if png_name:
        out += ["", f"![loss curves]({png_name})"]
    return "\n".join(out) + "\n"


def write_report(events: Sequence[dict[str, Any]], trajectory: Path, price: float | None,
                 target_tokens: float | None, top: int = 5) -> tuple[str, list[Path]]:
    """Render, write `<stem>.md` and `<stem>.png` next to the trajectory; (markdown, written paths)."""
    png_path = trajectory.with_suffix(".png")
    phase1 = phase1_ranking(events)
    groups = {f"phase 1: best {min(top, len(phase1))}": phase1[:top]}
    phase2 = phase2_ranking(events)
    if phase2:
        groups["phase 2: finalists"] = phase2
    plotted = plot_loss_curves(groups, png_path)
    text = render(events, price, target_tokens, plotted.name if plotted else None)
    md_path = trajectory.with_suffix(".md")
    md_path.write_text(text)
    return text, [md_path] + ([plotted] if plotted else [])
