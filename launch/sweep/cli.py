"""`python -m launch sweep ...` and `python -m launch sweep-report ...`: the recipe lab's command line.

Exit status: 0 when every candidate is recorded, 2 for a usage error (bad menu, missing corpus, another
sweep holding the file, a trajectory from a different sweep), 75 when a signal stopped a candidate or an
array task ended without recording its candidate (rerun the same command to resume), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from launch.config import resolve_config
from launch.detect import GpuProbe, detect_site, probe_gpus
from launch.sites import available_sites, read_local_file
from nanochat.configargs import EXIT_RESUMABLE, EXIT_USAGE, UsageError

SWEEP_EPILOG = """\
phase 1, the proxy sweep (same command again resumes it):
  python -m launch sweep --site cpu --menu env/example-menu.toml --candidates 24 --steps 15
phase 2, the finalists' stress test (appends to the same file):
  python -m launch sweep --finalists 3 --steps 1000 --from trajectory.jsonl
then: python -m launch sweep-report trajectory.jsonl --price-per-gpu-hour 2.5 --target-tokens 2e10
"""
DEFAULTS = {"strategy": "random", "steps": 60, "seed": 0, "eta": 2}
DEFAULT_VAL_TOKENS = 524288


def build_sweep_parser(sites: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch sweep", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG,
        description="Recipe lab: many short base_train runs from a menu, ranked by validation bits per byte.")
    parser.add_argument("--site", help=f"site profile: {', '.join(sites)} (default: detected; phase 2: the "
                                       "phase-1 site)")
    parser.add_argument("--menu", type=Path, help="TOML menu of knobs (env/example-menu.toml documents it)")
    parser.add_argument("--candidates", type=int, help="how many candidates (grid: all unless given)")
    parser.add_argument("--steps", type=int, help="optimizer steps per candidate (default 60)")
    parser.add_argument("--strategy", choices=("grid", "random", "halving"), help="default random")
    parser.add_argument("--seed", type=int, help="seed of the candidate draw (default 0)")
    parser.add_argument("--eta", type=int, help="halving: keep 1/eta per rung (default 2)")
    parser.add_argument("--val-tokens", type=int, help="validation tokens at the end of each run "
                                                       "(default: the site's EVAL_TOKENS)")
    parser.add_argument("--out", type=Path, help="trajectory file (default trajectory.jsonl; phase 2: --from)")
    parser.add_argument("--finalists", type=int, help="phase 2: rerun the best K phase-1 candidates")
    parser.add_argument("--from", dest="source", type=Path, help="phase 2: the phase-1 trajectory")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run the candidates recorded as failed again (a resume skips them otherwise)")
    parser.add_argument("--executor", choices=("local", "slurm"), help="default: the site's")
    parser.add_argument("--max-parallel", type=int, default=4, help="SLURM: array tasks at a time (default 4)")
    parser.add_argument("--sweep-dir", type=Path, help="candidate folders (default <cache>/sweeps/<out>-<hash>)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any site profile key, e.g. --set NANOCHAT_BASE_DIR=/data/cache")
    return parser


def _overrides(assignments: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise UsageError(f"--set {assignment!r}: expected KEY=VALUE")
        overrides[name.strip()] = value
    return overrides


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")


def sweep_main(argv: Sequence[str], repo_root: Path, environ: Mapping[str, str] | None = None,
               probe: GpuProbe = probe_gpus, which: Callable[[str], str | None] = shutil.which) -> int:
    sites = available_sites(repo_root)
    args = build_sweep_parser(sites).parse_args(list(argv))
    try:
        return _sweep(args, sites, repo_root, os.environ if environ is None else environ, probe, which)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _sweep(args, sites, repo_root: Path, environ, probe, which) -> int:
    from launch.sweep import campaign
    from launch.sweep.trajectory import SweepLock, check_is_trajectory, read_events

    for name in ("candidates", "steps", "val_tokens", "finalists", "max_parallel"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.eta is not None and args.eta < 2:
        raise UsageError(f"--eta must be at least 2, got {args.eta} (halving keeps 1/eta of the candidates per rung)")
    phase = 2 if args.finalists else 1
    if phase == 1 and (args.menu is None or args.source is not None):
        raise UsageError("phase 1 needs --menu MENU.toml (phase 2 is --finalists K --from TRAJECTORY)")
    if phase == 2 and (args.source is None or args.menu is not None):
        raise UsageError("phase 2 needs --from TRAJECTORY (the phase-1 file) and no --menu")
    phase1_header = None
    if phase == 2:
        source_events = read_events(args.source)
        phase1_header = next((e for e in source_events if e.get("event") == "header" and e.get("phase") == 1), None)
        if phase1_header is None:
            raise UsageError(f"{args.source} holds no phase-1 sweep (no header line)")
    site = args.site or (phase1_header or {}).get("site")
    if site:
        why = "from --site" if args.site else f"from {args.source}"
    else:
        preferred = read_local_file(repo_root)[1].get("NANOCHAT_SITE", "")
        site, why = detect_site(sites, environ, which, probe, preferred)
    print(f"[sweep] site {site} ({why})", file=sys.stderr)
    overrides = _overrides(args.assignments)
    if phase1_header is not None and "NANOCHAT_BASE_DIR" not in overrides:
        overrides["NANOCHAT_BASE_DIR"] = phase1_header["cache_dir"]
    config = resolve_config(site, repo_root, overrides, environ, probe)
    problem = campaign.corpus_problem(config)
    if problem:
        raise UsageError(problem)
    os.environ.update(config.stage_env)  # before torch is imported: thread counts, allocator settings
    from launch.sweep.menu import load_menu

    out = args.out or (args.source if phase == 2 else Path("trajectory.jsonl"))
    check_is_trajectory(out)  # before the lock: a refused --out leaves no <out>.lock behind
    if phase == 1:
        menu = load_menu(args.menu)
        defaults = {**DEFAULTS, **menu.defaults}
        strategy = args.strategy or defaults["strategy"]
        count = args.candidates or defaults.get("candidates")
        seed = defaults["seed"] if args.seed is None else args.seed
        steps, eta = args.steps or defaults["steps"], args.eta or defaults["eta"]
        val_tokens = (args.val_tokens or defaults.get("val_tokens") or config.run.eval_tokens
                      or DEFAULT_VAL_TOKENS)
        settings = campaign.base_settings(config, menu)
        header = {"event": "header", "phase": 1, "menu": menu.describe(), "menu_path": str(args.menu),
                  "strategy": strategy, "seed": seed, "steps": steps, "candidates": count, "val_tokens": val_tokens,
                  "eta": eta if strategy == "halving" else None, "base_settings": settings}
    else:
        steps = args.steps or DEFAULTS["steps"] * 10
        val_tokens = args.val_tokens or phase1_header["val_tokens"]
        settings = phase1_header["base_settings"]
        header = {"event": "header", "phase": 2, "finalists": args.finalists, "steps": steps,
                  "val_tokens": val_tokens, "from": str(args.source), "base_settings": settings}
    header.update(site=site, cache_dir=str(config.site.cache_dir), code_version=campaign.code_version(repo_root), executor=config.site.executor
                  if args.executor is None else args.executor, started_at=campaign.now().isoformat(timespec="seconds"))
    sweep_dir = args.sweep_dir or campaign.default_sweep_dir(config.site.cache_dir, out)
    plan = campaign.SweepPlan(phase, config, out, sweep_dir, steps, val_tokens, settings, header)
    executor = _executor(header["executor"], config, repo_root, args.max_parallel)
    started = campaign.now()
    from launch.sweep.worker import StoppedBySignal

    with SweepLock(out):
        sweep = campaign.Sweep(plan, executor, retry_failed=args.retry_failed)
        sweep.open()
        try:
            if phase == 1:
                campaign.run_phase1(sweep, menu, strategy, count, seed, eta, campaign.vocab_size(config))
            else:
                finalists = campaign.phase1_ranking(read_events(args.source))[:args.finalists]
                if not finalists:
                    raise UsageError(f"{args.source} has no evaluated, non-diverged phase-1 candidate")
                sweep.say(f"phase 2: {len(finalists)} finalists for {steps} steps: "
                          + ", ".join(e["id"] for e in finalists))
                campaign.run_phase2(sweep, finalists)
        except (StoppedBySignal, campaign.RunsMissing) as exc:
            sweep.say(str(exc))
            return EXIT_RESUMABLE
        except KeyboardInterrupt:
            sweep.say("interrupted; rerun the same command to resume")
            return 130
        sweep.finish(started)
    print(f"[sweep] trajectory: {out}; next: python -m launch sweep-report {out}", file=sys.stderr)
    return 0


def _executor(name: str, config, repo_root: Path, max_parallel: int):
    from launch.sweep.executors import SlurmArrayExecutor, WorkstationExecutor

    if name == "slurm":
        return SlurmArrayExecutor(config, repo_root, repo_root / "logs", max_parallel)
    return WorkstationExecutor()


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch sweep-report",
        description="Rank a sweep's candidates, plot the best loss curves and work out what it cost.")
    parser.add_argument("trajectory", type=Path)
    parser.add_argument("--price-per-gpu-hour", type=float,
                        help="default: PRICE_PER_GPU_HOUR of the sweep's site file or .env.local")
    parser.add_argument("--target-tokens", type=float, help="token budget of the target run to project the cost of")
    parser.add_argument("--top", type=int, default=5, help="loss curves to plot (default 5)")
    return parser


def report_main(argv: Sequence[str], repo_root: Path, environ: Mapping[str, str] | None = None) -> int:
    args = build_report_parser().parse_args(list(argv))
    try:
        from launch.sweep import report
        from launch.sweep.trajectory import read_events

        _positive("--top", args.top)
        price, tokens = args.price_per_gpu_hour, args.target_tokens
        if price is not None and not (math.isfinite(price) and price >= 0):
            raise UsageError(f"--price-per-gpu-hour must be a finite number >= 0, got {price}")
        if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
            raise UsageError(f"--target-tokens must be a finite number > 0, got {tokens}")
        if args.trajectory.suffix in (".md", ".png"):
            raise UsageError(f"the report is written next to the trajectory as {args.trajectory.stem}.md and .png, "
                             f"which would overwrite {args.trajectory}: name the trajectory *.jsonl")
        events = read_events(args.trajectory)
        if not events:
            raise UsageError(f"{args.trajectory} is empty or does not exist")
        price = args.price_per_gpu_hour
        site = next((e.get("site") for e in events if e.get("event") == "header"), None)
        if price is None and site in available_sites(repo_root):
            price = resolve_config(site, repo_root, {}, environ, probe=lambda: []).price_per_gpu_hour
        text, written = report.write_report(events, args.trajectory, price, args.target_tokens, args.top)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(text)
    for path in written:
        print(f"[sweep-report] wrote {path}", file=sys.stderr)
    return 0
