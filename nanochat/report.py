"""Report sections: each stage writes report/<stage>.json atomically; report.md is assembled from them.

An evaluation stage records in its section the `inputs` it measured (`evaluation_inputs`: its settings and
the size and modification time of every file it read). `previous_result` finds that section again when
nothing has changed, and `already_evaluated` says so in one line, so running a finished evaluation again
is a no-op, as for every stage; report.md marks a section whose files have changed since as stale
(`changed_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nanochat.configargs import UsageError
from nanochat.leftovers import temp_name
from nanochat.paths import report_dir
from nanochat.runtime import print0_before_setup


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_section(stage: str, data: dict[str, Any], root: Path | None = None) -> Path:
    """Record one stage's results (settings, metrics, timings) as report/<stage>.json."""
    section = {"stage": stage, "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    path = report_dir(root) / f"{stage}.json"
    atomic_write_text(path, json.dumps(section, indent=2, default=str) + "\n")
    return path


def file_fingerprints(paths: Iterable[Path]) -> list[str]:
    """'path size mtime_ns' of each file, sorted: what a result was computed from (rewriting a file changes it)."""
    result = []
    for path in paths:
        stat = Path(path).stat()
        result.append(f"{path} {stat.st_size} {stat.st_mtime_ns}")
    return sorted(result)


def previous_result(stage: str, inputs: dict[str, Any], root: Path | None = None) -> dict[str, Any] | None:
    """report/<stage>.json when it was written for exactly these `inputs`, else None (also when unreadable)."""
    path = report_dir(root) / f"{stage}.json"
    try:
        section = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return section if section.get("inputs") == json.loads(json.dumps(inputs, default=str)) else None


def changed_inputs(section: dict[str, Any]) -> list[str]:
    """The files an evaluation section was computed from that have changed or gone since (none recorded: [])."""
    changed = []
    for fingerprint in (section.get("inputs") or {}).get("files", []):
        path = fingerprint.rsplit(" ", 2)[0]
        if not Path(path).exists() or file_fingerprints([Path(path)]) != [fingerprint]:
            changed.append(path)
    return changed


def evaluation_inputs(config: Any, files: Iterable[Path], **identity: Any) -> dict[str, Any]:
    """What an evaluation measures: the stage's settings (all but `force`), `identity` (e.g. which checkpoint)
    and the fingerprints of the files it reads."""
    settings = {name: value for name, value in dataclasses.asdict(config).items() if name != "force"}
    return {"settings": settings, **identity, "files": file_fingerprints(files)}


def already_evaluated(stage: str, inputs: dict[str, Any], subject: str, root: Path | None = None) -> bool:
    """True, after one line saying so, when report/<stage>.json holds the results for exactly `inputs`."""
    previous = previous_result(stage, inputs, root)
    if previous is None:
        return False
    print0_before_setup(f"{stage}: {report_dir(root) / f'{stage}.json'} already holds the results for {subject} "
                        f"(written {previous['written_at']}); nothing to do (--force evaluates again)")
    return True


def read_sections(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every report/<stage>.json; one that is unreadable or not shaped like a section is a UsageError naming it."""
    directory = report_dir(root)
    if not directory.is_dir():
        return {}
    return {path.stem: _read_section(path) for path in sorted(directory.glob("*.json"))}


HISTORIES = ("loss_history", "val_history", "reward_history", "gsm8k_history")


def _read_section(path: Path) -> dict[str, Any]:
    try:
        section = json.loads(path.read_text(encoding="utf-8"))
        problem = _section_problem(section)
    except (OSError, ValueError) as exc:
        problem = str(exc)
    if problem:
        raise UsageError(f"{path} is not a readable report section ({problem}): run the stage that writes it "
                         "again, or delete the file")
    return section


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _section_problem(section: Any) -> str | None:
    """What keeps `section` from being rendered (the fields the report formats or plots), or None."""
    if not isinstance(section, dict):
        return "not a JSON object"
    if section.get("seconds") is not None and not _is_number(section["seconds"]):
        return "'seconds' is not a number"
    for key in ("metrics", "settings"):
        if section.get(key) is not None and not isinstance(section[key], dict):
            return f"{key!r} is not an object"
    if not all(_is_number(v) for v in (section.get("metrics") or {}).values()):
        return "a metric is not a number"
    for key in HISTORIES:
        points = section.get(key)
        if points is not None and not (isinstance(points, list) and all(
                isinstance(p, list) and len(p) >= 2 and all(_is_number(v) for v in p) for p in points)):
            return f"{key!r} is not a list of [step, value] points"
    return None


STAGE_ORDER = ("demo_data", "tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_sft",
               "chat_rl", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl")
PHASES = ("BASE", "MID", "SFT", "RL")
METRICS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")
_SKIP = {"stage", "written_at", "settings", "phase", "metrics", "loss_history", "val_history", "reward_history",
         "gsm8k_history", "seconds"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ordered(sections: dict[str, dict[str, Any]]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in sections]
    return known + sorted(s for s in sections if s not in STAGE_ORDER)


def results_table(sections: dict[str, dict[str, Any]]) -> str:
    """The BASE/MID/SFT/RL table; a cell is '-' where that phase did not measure that metric."""
    cells: dict[tuple[str, str], Any] = {}
    for section in sections.values():
        phase = section.get("phase")
        for name, value in (section.get("metrics") or {}).items():
            if phase in PHASES:
                cells[(name, phase)] = value
    names = list(METRICS) + sorted({n for n, _ in cells} - set(METRICS))
    phases = [p for p in PHASES if any(k[1] == p for k in cells)] or ["BASE"]
    lines = ["| Metric | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for name in names:
        row = [_fmt(cells[(name, p)]) if (name, p) in cells else "-" for p in phases]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_markdown(sections: dict[str, dict[str, Any]], environment: dict[str, Any], plots: list[Path]) -> str:
    """report.md: environment, results table, plots, then each stage's timing, results and settings."""
    out = ["# nanochat training report", "", "## Environment", ""]
    out += [f"- **{k}**: {v}" for k, v in environment.items()]
    total = sum(s.get("seconds") or 0 for s in sections.values())
    out += ["", f"Total stage time: {total / 60:.1f} min", "", "## Results", "", results_table(sections), ""]
    if plots:
        out += ["## Curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    for name in _ordered(sections):
        section = sections[name]
        out += [f"## {name}", ""]
        changed = changed_inputs(section)
        if changed:
            stage, _, source = name.partition("_eval_")
            rerun = f"python -m scripts.{stage}_eval --source {source}" if source else f"python -m scripts.{name}"
            out.append(f"- **stale**: {len(changed)} of the files it was computed from changed since (e.g. "
                       f"{changed[0]}); run `{rerun}` again")
        if section.get("seconds") is not None:
            out.append(f"- time: {section['seconds']:.1f} s")
        for key, value in section.items():
            if key not in _SKIP and not isinstance(value, (list, dict)):
                out.append(f"- {key}: {_fmt(value)}")
            elif key not in _SKIP and isinstance(value, list) and all(isinstance(v, str) for v in value):
                out += [f"- {key}:"] + [f"  - {v}" for v in value]
        for metric, value in (section.get("metrics") or {}).items():
            out.append(f"- {metric}: {_fmt(value)}")
        if section.get("settings"):
            settings = ", ".join(f"{k}={v}" for k, v in section["settings"].items())
            out += ["", f"<details><summary>settings</summary>\n\n{settings}\n\n</details>"]
        out.append("")
    return "\n".join(out)
