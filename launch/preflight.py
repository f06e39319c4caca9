"""Preflight: everything a launch needs, checked where it is cheap (the login node), before anything runs.

For each requested stage, the cache inputs it reads must exist unless an earlier requested stage produces
them; the cache filesystem must have room for what the stages write; the batch flags must fit the GPUs;
a wandb run name needs wandb installed (the stages would refuse it only once the job runs).
Every problem is one line naming the command that fixes it; any problem makes the launcher exit 2.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launch import memory
from launch.config import LaunchConfig
from launch.detect import GpuProbe, probe_gpus
from launch.slurm_env import inside_job
from launch.stages import CHECKPOINT_PHASE, STAGES_BY_NAME, stage_needs
from nanochat import paths
from nanochat.tracking import TRACKING_OFF, wandb_installed

DEMO_MARKER = "DEMO"
MIN_DEMO_SHARDS = 2
TRAINING_STAGES = ("base_train", "mid_train", "chat_sft", "chat_rl")

FreeBytes = Callable[[Path], int]


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str

    def line(self) -> str:
        return f"preflight: {self.message} -> fix: {self.fix}"


@dataclass
class PreflightReport:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return ([f"preflight: ok  {text}" for text in self.passed]
                + [f"preflight: warning: {text}" for text in self.warnings]
                + [problem.line() for problem in self.problems])


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _hf_dataset_present(hf_dir: Path, dataset: str) -> bool:
    """A `datasets` cache folder (`org___name`) or a hub cache folder (`datasets--org--name`) under hf/."""
    org, name = dataset.split("/")
    wanted = {f"{org}___{name}", f"datasets--{org}--{name}"}
    if not hf_dir.is_dir():
        return False
    return any(p.is_dir() and p.name in wanted for depth in ("*", "*/*", "*/*/*") for p in hf_dir.glob(depth))


def _checkpoint_present(root: Path, phase: str, tag: str) -> bool:
    """A checkpoint exists once its meta file does (checkpoints are written meta last)."""
    return any(paths.checkpoint_dir(phase, tag, root).glob("meta_*.json"))


class _Checker:
    def __init__(self, config: LaunchConfig, stages: Sequence[str]):
        self.config = config
        self.stages = list(stages)
        self.root = config.site.cache_dir
        self.site = config.site.name
        self.launch = f"python -m launch --site {self.site}"

    def artifact(self, need: str) -> Problem | str:
        """A Problem when `need` is missing from the cache, else a description of what is there."""
        root, site = self.root, self.config.site
        if need == "shards":
            count = len(paths.shard_paths(paths.data_dir(root)))
            wanted = MIN_DEMO_SHARDS if site.data == "demo" else site.shards
            if count >= wanted:
                return f"{count} shards in {paths.data_dir(root)}"
            fix = (f"{self.launch} --stages demo_data" if site.data == "demo"
                   else f"bash scripts/download_data.sh --site {self.site} --shards {site.shards}")
            return Problem(f"{paths.data_dir(root)} has {count} parquet shards, {wanted} needed", fix)
        if need == "tokenizer":
            folder = paths.tokenizer_dir(root)
            if (folder / "tokenizer.json").is_file() and (folder / "token_bytes.pt").is_file():
                return f"tokenizer in {folder}"
            return Problem(f"no trained tokenizer in {folder}", f"{self.launch} --stages tok_train")
        if need == "tasks":
            if any(paths.tasks_dir(root).glob("*.jsonl")):
                return f"demo task files in {paths.tasks_dir(root)}"
            return Problem(f"no demo task files in {paths.tasks_dir(root)}", f"{self.launch} --stages demo_data")
        if need == "eval_bundle":
            folder = root / "eval_bundle"
            if folder.is_dir() and any(folder.iterdir()):
                return f"CORE eval bundle in {folder}"
            return Problem(f"no CORE eval bundle in {folder}",
                           f"bash scripts/download_data.sh --site {self.site} (on a node with internet)")
        if need.startswith("hf:"):
            dataset = need.removeprefix("hf:")
            if _hf_dataset_present(root / "hf", dataset):
                return f"{dataset} in {root / 'hf'}"
            return Problem(f"dataset {dataset} is not in {root / 'hf'}",
                           f"bash scripts/download_data.sh --site {self.site} (on a node with internet)")
        if need.startswith("ckpt:"):
            source = need.removeprefix("ckpt:")
            phase, tag = CHECKPOINT_PHASE[source], self.config.run.model_tag
            producer = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}[source]
            if _checkpoint_present(root, phase, tag):
                return f"{phase} checkpoint {tag}"
            return Problem(f"no {phase} checkpoint {paths.checkpoint_dir(phase, tag, root)}",
                           f"{self.launch} --from {producer}")
        raise ValueError(f"unknown artifact {need!r}")

    def inputs(self, report: PreflightReport) -> None:
        produced: set[str] = set()
        checked: set[str] = set()
        for name in self.stages:
            stage = STAGES_BY_NAME[name]
            for need in stage_needs(stage, self.config.site.data, self.config.run.chat_eval_source):
                if need in produced or need in checked:
                    continue
                checked.add(need)
                result = self.artifact(need)
                if isinstance(result, Problem):
                    report.problems.append(Problem(f"{name}: {result.message}", result.fix))
                else:
                    report.passed.append(result)
            produced.update(stage.produces)
        marker = (self.root / DEMO_MARKER).exists()
        if self.config.site.data == "real" and marker:
            report.problems.append(Problem(
                f"{self.root} holds the demo corpus (file {DEMO_MARKER}) but DATA=real",
                "set NANOCHAT_BASE_DIR in .env.local to your real-data cache, or use --data demo"))

    def disk(self, report: PreflightReport, free: FreeBytes) -> None:
        run = self.config.run
        width = memory.model_width(run.depth, run.aspect_ratio)
        needed = 0
        for name in self.stages:
            if name in TRAINING_STAGES:
                needed += memory.training_stage_disk_bytes(run.depth, width, run.vocab_size)
            elif name == "demo_data":
                needed += int(2 * run.demo_megabytes * 1e6)
            else:
                needed += memory.SMALL_STAGE_BYTES
        available = free(self.root)
        if available < needed:
            report.problems.append(Problem(
                f"{needed / 1e9:.1f} GB needed in {self.root}, {available / 1e9:.1f} GB free",
                "free space there, or set NANOCHAT_BASE_DIR in .env.local to a larger filesystem"))
        else:
            report.passed.append(f"disk: {available / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB needed")

    def batch(self, report: PreflightReport) -> None:
        run, site = self.config.run, self.config.site
        world = site.world_size
        per_step = run.device_batch_size * run.max_seq_len * world
        if run.total_batch_size % per_step:
            fixed = max(per_step, round(run.total_batch_size / per_step) * per_step)
            report.problems.append(Problem(
                f"total batch {run.total_batch_size} is not a multiple of device batch {run.device_batch_size} x "
                f"seq {run.max_seq_len} x {world} processes = {per_step}",
                f"{self.launch} --total-batch-size {fixed}"))
        else:
            report.passed.append(f"batch: {run.total_batch_size // per_step} accumulation steps of "
                                 f"{run.device_batch_size} x {run.max_seq_len} on {world} processes")
        if site.gpus_per_node == 0 or site.gpu_memory_gb <= 0:
            return
        width = memory.model_width(run.depth, run.aspect_ratio)

        def peak(batch: int) -> float:
            return memory.estimate_peak_gb(run.depth, width, run.max_seq_len, batch, run.vocab_size)

        estimate = peak(run.device_batch_size)
        if estimate <= site.gpu_memory_gb:
            report.passed.append(f"memory: about {estimate:.0f} GB of {site.gpu_memory_gb:g} GB per GPU")
            return
        fitting = run.device_batch_size
        while fitting > 1 and peak(fitting) > site.gpu_memory_gb:
            fitting //= 2
        text = (f"device batch {run.device_batch_size} at depth {run.depth}, seq {run.max_seq_len} needs about "
                f"{estimate:.0f} GB per GPU, the GPUs have {site.gpu_memory_gb:g} GB")
        if estimate > site.gpu_memory_gb * memory.MEMORY_REFUSE_FACTOR:
            report.problems.append(Problem(text, f"{self.launch} --device-batch-size {fitting}"))
        else:
            report.warnings.append(f"{text} (within the estimate's margin; if it runs out of memory use "
                                   f"--device-batch-size {fitting})")

    def gpus(self, report: PreflightReport, probe: GpuProbe, environ: Mapping[str, str] | None) -> None:
        site = self.config.site
        if site.executor != "local":
            return
        if site.nodes > 1 and not inside_job(environ):
            report.problems.append(Problem(f"NODES={site.nodes} needs a SLURM allocation",
                                           f"{self.launch} --executor slurm"))
        if site.gpus_per_node > 0 and not probe():
            report.problems.append(Problem(f"site {site.name} runs on {site.gpus_per_node} GPUs but nvidia-smi "
                                           f"finds none here", "python -m launch --site cpu"))


    def tracking(self, report: PreflightReport, installed: Callable[[], bool]) -> None:
        run_name = self.config.run.run_name
        if not run_name or run_name == TRACKING_OFF:
            return
        tracked = [name for name in self.stages if ("--run", "run_name") in STAGES_BY_NAME[name].flags]
        if tracked and not installed():
            report.problems.append(Problem(
                f"RUN_NAME={run_name} logs {', '.join(tracked)} to wandb, which is not installed here",
                "pip install wandb, or unset RUN_NAME"))


def run_preflight(config: LaunchConfig, stages: Sequence[str], probe: GpuProbe = probe_gpus,
                  free: FreeBytes = free_bytes, environ: Mapping[str, str] | None = None,
                  tracker_installed: Callable[[], bool] | None = None) -> PreflightReport:
    """Check inputs, disk, batch flags, GPUs and experiment tracking for running `stages` with `config`."""
    checker = _Checker(config, stages)
    report = PreflightReport()
    checker.inputs(report)
    checker.disk(report, free)
    checker.batch(report)
    checker.gpus(report, probe, environ)
    checker.tracking(report, tracker_installed or wandb_installed)
    return report
