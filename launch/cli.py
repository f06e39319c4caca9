"""`python -m launch`: pick a site, resolve its settings, preflight, then run or submit the stages.

Exit status: the failing stage's status (0 when every stage finished, 75 when stopped for a requeue),
2 for a usage error or a preflight refusal (nothing is run or submitted), 0 after --dry-run,
--print-config or a clean --check.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from launch import keys as K
from launch.commands import pipeline_commands
from launch.config import format_config, resolve_config
from launch.detect import GpuProbe, detect_site, probe_gpus
from launch.executors import Executor, LaunchPlan, LocalExecutor, SlurmExecutor, slurm_parameters
from launch.preflight import FreeBytes, free_bytes, run_preflight
from launch.sites import available_sites, read_local_file
from launch.stages import STAGE_NAMES, select_stages
from nanochat.configargs import EXIT_USAGE, UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("sweep", "sweep-report")  # launch.sweep: the recipe lab
EPILOG = """\
settings come from env/<site>.env, then .env.local (see env/example.env.local), then the command line;
--print-config shows every value and its source. Flags after `--` go to base_train unchanged.

examples:
  python -m launch --site cpu                       whole pipeline on the demo corpus, on this machine
  python -m launch --site a100-slurm --check        is the cluster cache ready? (run on the login node)
  python -m launch --site a100-slurm --from mid_train --dry-run
  python -m launch --site h100x8 --depth 24 --device-batch-size 16 -- --some-base-train-flag 1
  python -m launch sweep --site cpu --menu env/example-menu.toml   recipe lab (docs/recipe-lab.md)
  python -m launch sweep-report trajectory.jsonl
"""


def build_parser(sites: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run the nanochat pipeline (or part of it) on a site: this machine or a SLURM cluster.")
    where = parser.add_argument_group("what and where")
    where.add_argument("--site", help=f"site profile env/<site>.env: {', '.join(sites)} (default: detected)")
    which = where.add_mutually_exclusive_group()
    which.add_argument("--stages", metavar="A,B,...", help=f"run only these stages: {', '.join(STAGE_NAMES)}")
    which.add_argument("--from", dest="start", metavar="STAGE", help="run the default pipeline from STAGE on")
    where.add_argument("--executor", choices=("local", "slurm"), help="run here, or submit a SLURM job")
    where.add_argument("--data", choices=("demo", "real"), help="built-in demo corpus or the real datasets")
    mode = parser.add_argument_group("modes")
    mode.add_argument("--dry-run", action="store_true", help="print commands, environment, executor; run nothing")
    mode.add_argument("--print-config", action="store_true", help="print every resolved setting and its source")
    mode.add_argument("--check", action="store_true", help="run the preflight checks only")
    mode.add_argument("--force", action="store_true", help="launch even when preflight finds problems")
    flags = parser.add_argument_group("settings (override the site profile and .env.local)")
    for key in K.KEYS:
        if key.cli_flag and key.group == K.MODEL:
            metavar = "{" + ",".join(key.choices) + "}" if key.choices else key.kind.__name__.upper()
            flags.add_argument(key.cli_flag, dest=key.name, metavar=metavar, help=key.help)
    flags.add_argument("--compile", dest="COMPILE", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model")
    flags.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="set any profile key, e.g. --set SBATCH_PARTITION=gpu (repeatable)")
    return parser


def cli_overrides(args: argparse.Namespace) -> dict[str, str]:
    """KEY -> raw text for every setting given on the command line."""
    overrides = {}
    for assignment in args.assignments:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise UsageError(f"--set {assignment!r}: expected KEY=VALUE")
        overrides[name.strip()] = value
    for key in K.KEYS:
        value = getattr(args, key.name, None)
        if value is not None:
            overrides[key.name] = str(value).lower() if isinstance(value, bool) else str(value)
    if args.executor:
        overrides["EXECUTOR"] = args.executor
    if args.data:
        overrides["DATA"] = args.data
    return overrides


def dry_run_text(plan: LaunchPlan) -> str:
    config = plan.config
    lines = [f"executor: {config.site.executor}"]
    if config.site.executor == "slurm":
        lines.append("submitit parameters (stages run inside the allocation):")
        params = slurm_parameters(config, plan.repo_root, f"nanochat-{config.site.name}")
        lines.extend(f"  {name} = {value}" for name, value in params.items())
    lines.append("environment (set by the launcher, on top of yours):")
    lines.extend(f"  {name}={value}" for name, value in config.stage_env.items())
    lines.append(f"working directory: {plan.repo_root}")
    lines.append("commands:")
    lines.extend(f"  {command.shell()}" for command in pipeline_commands(plan.stages, config, plan.extra_base_train))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, repo_root: Path = REPO_ROOT,
         environ: Mapping[str, str] | None = None, probe: GpuProbe = probe_gpus,
         which: Callable[[str], str | None] = shutil.which, free: FreeBytes = free_bytes,
         executors: Mapping[str, Callable[[], Executor]] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from launch.sweep import cli as sweep_cli

        if argv[0] == "sweep":
            return sweep_cli.sweep_main(argv[1:], repo_root, environ, probe, which)
        return sweep_cli.report_main(argv[1:], repo_root, environ)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    sites = available_sites(repo_root)
    args = build_parser(sites).parse_args(own)
    try:
        if args.site:
            site, why = args.site, "from --site"
        else:
            preferred = read_local_file(repo_root)[1].get("NANOCHAT_SITE", "")
            site, why = detect_site(sites, environ, which, probe, preferred)
        print(f"[launch] site {site} ({why})", file=sys.stderr)
        config = resolve_config(site, repo_root, cli_overrides(args), environ, probe)
        if args.print_config:
            print(format_config(config))
            return 0
        stages = select_stages(config.site.data, args.stages, args.start)
        for note in config.notes:
            print(f"[launch] {note}", file=sys.stderr)
        plan = LaunchPlan(config, tuple(stages), tuple(extra), repo_root, repo_root / "logs")
        report = run_preflight(config, stages, probe, free, environ)
        if args.check:
            print("\n".join(report.lines()))
            return 0 if report.ok else EXIT_USAGE
        if args.dry_run:
            print(dry_run_text(plan))
            print("\n".join(report.lines()))
            return 0
        for line in report.lines():
            print(line, file=sys.stderr)
        if not report.ok and not args.force:
            print(f"[launch] preflight found {len(report.problems)} problem(s); nothing was run or submitted "
                  f"(--force launches anyway)", file=sys.stderr)
            return EXIT_USAGE
        factories = executors or {"local": LocalExecutor, "slurm": SlurmExecutor}
        return factories[config.site.executor]().launch(plan)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
