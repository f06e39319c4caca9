"""The resolved launch configuration: code defaults < env/<site>.env < .env.local < exported < command line.

"Exported" covers the variables the shell hands over on purpose: `$NANOCHAT_BASE_DIR`, and sbatch's own
input variables (`$SBATCH_TIMELIMIT`, `$SBATCH_ACCOUNT`, ...), which sbatch would apply over the job
script's lines anyway, so the launcher shows and uses the value the job will get.
`resolve_config` reads the layers, records which one supplied each key (shown by `--print-config`),
expands `~` and `$USER` in the cache path, lets the GPUs nvidia-smi finds replace the profile's count and
memory when stages run on this machine, and applies the one automatic adjustment: on GPUs of 40 GB or
less the site's device batch is halved (gradient accumulation doubles, the total batch stays).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from launch import keys as K
from launch.detect import GpuProbe, probe_gpus
from launch.sites import read_env_file, read_local_file, site_file
from nanochat.configargs import UsageError, require
from nanochat.paths import check_model_tag, expand_path

SMALL_GPU_GB = 40
MIN_VOCAB_SIZE = 265  # nanochat.tokenizer.MIN_VOCAB_SIZE (256 bytes + special tokens); importing it pulls in torch
MAX_DEMO_MEGABYTES = 10_000  # the most demo_data writes
SOURCE_DEFAULT = "default"
SOURCE_CLI = "cli"
SOURCE_PROBE = "nvidia-smi"
SOURCE_ADJUSTED = "adjusted for 40 GB GPUs"
# sbatch's input environment variables among the launcher's keys (they override a job script's #SBATCH lines)
SBATCH_INPUT_KEYS = tuple(key.name for key in K.KEYS if key.name.startswith("SBATCH_"))
EXPORTED_KEYS = ("NANOCHAT_BASE_DIR", *SBATCH_INPUT_KEYS)


@dataclass(frozen=True)
class SiteProfile:
    """Where and on what the stages run."""

    name: str
    executor: str
    data: str
    cache_dir: Path
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    device_type: str
    shards: int

    def __post_init__(self):
        require(self.gpus_per_node >= 0, f"GPUS_PER_NODE must be >= 0, got {self.gpus_per_node}")
        require(self.nodes >= 1, f"NODES must be >= 1, got {self.nodes}")
        require((self.gpus_per_node == 0) == (self.device_type != "cuda"),
                f"DEVICE_TYPE={self.device_type} does not match GPUS_PER_NODE={self.gpus_per_node}")
        require(self.shards >= 2, f"SHARDS must be >= 2 (one train, one validation), got {self.shards}")

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes


@dataclass(frozen=True)
class SlurmSettings:
    """What a SLURM submission asks for."""

    partition: str | None
    account: str | None
    time_limit: str
    cpus_per_task: int
    mem_per_node: str | None
    mail_user: str | None
    mail_type: str | None
    signal_lead_seconds: int
    max_requeues: int

    def __post_init__(self):
        self.timeout_minutes  # noqa: B018 - validates the format
        require(self.cpus_per_task >= 1, f"CPUS_PER_TASK must be >= 1, got {self.cpus_per_task}")
        require(self.signal_lead_seconds >= 30, "SIGNAL_LEAD_SECONDS must leave a save at least 30 s")
        require(self.signal_lead_seconds < self.timeout_minutes * 60,
                f"SIGNAL_LEAD_SECONDS={self.signal_lead_seconds} must be shorter than SBATCH_TIMELIMIT="
                f"{self.time_limit}, or every run is told to save and requeue as it starts; lower it or "
                f"lengthen the time limit")
        require(self.max_requeues >= 0, "MAX_REQUEUES must be >= 0")

    @property
    def timeout_minutes(self) -> int:
        """The limit in minutes, read as sbatch --time reads it: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S
        (so "30:00" is 30 minutes); seconds round up to the next minute."""
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", self.time_limit.strip())
        if not match:
            raise UsageError(f"SBATCH_TIMELIMIT={self.time_limit!r}: expected sbatch's --time format "
                             f"(minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS), e.g. 12:00:00")
        days, first, second, third = match.groups()
        if days is not None:
            hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        elif third is not None:
            hours, minutes, seconds = int(first), int(second), int(third)
        else:
            hours, minutes, seconds = 0, int(first), int(second or 0)
        return int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


@dataclass(frozen=True)
class RunSettings:
    """Model and schedule settings the stages receive as flags (None: flag omitted, stage default)."""

    depth: int
    aspect_ratio: int | None
    head_dim: int | None
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    vocab_size: int
    tokenizer_max_chars: int | None
    window_pattern: str
    precision: str
    compile: bool
    base_iterations: int | None
    target_param_data_ratio: float | None
    mid_iterations: int | None
    sft_iterations: int | None
    rl_iterations: int | None
    eval_every: int | None
    eval_tokens: int | None
    save_every: int | None
    eval_max_per_task: int | None
    eval_split_tokens: int | None
    finetune_eval_every: int | None
    chat_max_new_tokens: int | None
    chat_eval_source: str
    demo_megabytes: float
    seed: int
    model_tag: str
    run_name: str | None

    def __post_init__(self):
        for name in ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "vocab_size"):
            require(getattr(self, name) >= 1, f"{name.upper()} must be >= 1, got {getattr(self, name)}")
        require(set(self.window_pattern) <= {"S", "L"} and self.window_pattern != "",
                f"WINDOW_PATTERN={self.window_pattern!r}: use letters S (sliding) and L (full), e.g. SSSL")
        require(self.vocab_size >= MIN_VOCAB_SIZE, f"{_key_and_flag('vocab_size')} must be at least {MIN_VOCAB_SIZE} "
                                                   f"(256 bytes + special tokens), got {self.vocab_size}")
        require(0 < self.demo_megabytes <= MAX_DEMO_MEGABYTES,
                f"{_key_and_flag('demo_megabytes')} must be in (0, {MAX_DEMO_MEGABYTES}], got {self.demo_megabytes:g}")
        require(self.seed >= 0, f"{_key_and_flag('seed')} must be zero or positive, got {self.seed}")
        # unset (None) leaves the stage default; anything else must be a value the stage accepts
        for name in ("base_iterations", "mid_iterations", "sft_iterations", "rl_iterations", "eval_max_per_task",
                     "finetune_eval_every"):
            value = getattr(self, name)
            require(value is None or value == -1 or value > 0,
                    f"{_key_and_flag(name)} must be positive or -1, got {value}")
        for name in ("aspect_ratio", "head_dim", "tokenizer_max_chars", "target_param_data_ratio", "eval_every",
                     "eval_tokens", "eval_split_tokens", "chat_max_new_tokens"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{_key_and_flag(name)} must be positive, got {value}")


def _key_and_flag(field_name: str) -> str:
    """`BASE_ITERATIONS (--num-iterations)`: the settings key and, where it has one, its launcher flag."""
    key = K.KEYS_BY_NAME[field_name.upper()]
    return f"{key.name} ({key.cli_flag})" if key.cli_flag else key.name


KEY_FIELDS: dict[str, tuple[str, str]] = {
    "EXECUTOR": ("site", "executor"), "DATA": ("site", "data"), "NANOCHAT_BASE_DIR": ("site", "cache_dir"),
    "GPUS_PER_NODE": ("site", "gpus_per_node"), "NODES": ("site", "nodes"),
    "GPU_MEMORY_GB": ("site", "gpu_memory_gb"), "DEVICE_TYPE": ("site", "device_type"),
    "SHARDS": ("site", "shards"),
    "SBATCH_PARTITION": ("slurm", "partition"), "SBATCH_ACCOUNT": ("slurm", "account"),
    "SBATCH_TIMELIMIT": ("slurm", "time_limit"), "CPUS_PER_TASK": ("slurm", "cpus_per_task"),
    "SBATCH_MEM_PER_NODE": ("slurm", "mem_per_node"), "SBATCH_MAIL_USER": ("slurm", "mail_user"),
    "SBATCH_MAIL_TYPE": ("slurm", "mail_type"), "SIGNAL_LEAD_SECONDS": ("slurm", "signal_lead_seconds"),
    "MAX_REQUEUES": ("slurm", "max_requeues"),
}
KEY_FIELDS.update({f.name.upper(): ("run", f.name) for f in fields(RunSettings)})


@dataclass(frozen=True)
class LaunchConfig:
    """Everything the launcher resolved: typed sections, the stage environment and where each value came from."""

    site: SiteProfile
    slurm: SlurmSettings
    run: RunSettings
    stage_env: dict[str, str]
    price_per_gpu_hour: float | None
    values: dict[str, object] = field(repr=False)
    sources: dict[str, str] = field(repr=False)
    notes: tuple[str, ...] = ()


def usable_cpu_count() -> int:
    """Cores this process may run on (honours affinity and SLURM cgroups), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _layered_raw_values(site: str, repo_root: Path, cli: Mapping[str, str]) -> tuple[dict, dict]:
    raw = {key.name: key.default for key in K.KEYS}
    sources = {key.name: SOURCE_DEFAULT for key in K.KEYS}
    site_path = site_file(repo_root, site)
    local_path, local_values = read_local_file(repo_root)
    K.check_known(cli, "the command line")
    layers = ((f"env/{site_path.name}", read_env_file(site_path)), (local_path.name, local_values), (SOURCE_CLI, cli))
    for label, values in layers:
        for name, text in values.items():
            raw[name] = text
            sources[name] = label
    return raw, sources


def resolve_config(site: str, repo_root: Path, cli: Mapping[str, str] | None = None,
                   environ: Mapping[str, str] | None = None, probe: GpuProbe = probe_gpus,
                   cpu_count: Callable[[], int] = usable_cpu_count) -> LaunchConfig:
    """Resolve `site` from its profile, .env.local and CLI key overrides (KEY -> raw text)."""
    environ = os.environ if environ is None else environ
    raw, sources = _layered_raw_values(site, repo_root, cli or {})
    for name in EXPORTED_KEYS:
        if environ.get(name) and sources[name] != SOURCE_CLI:
            raw[name], sources[name] = environ[name], f"${name} (exported)"
    values = {name: K.KEYS_BY_NAME[name].parse(text, sources[name]) if name in K.KEYS_BY_NAME else text
              for name, text in raw.items()}
    require(raw["NANOCHAT_BASE_DIR"].strip() != "",
            f"NANOCHAT_BASE_DIR is empty (from {sources['NANOCHAT_BASE_DIR']}): name the cache folder, e.g. "
            "NANOCHAT_BASE_DIR=~/.cache/nanochat, or leave the key out for the site's default")
    values["NANOCHAT_BASE_DIR"] = expand_path(raw["NANOCHAT_BASE_DIR"], environ)
    notes: list[str] = []

    if values["EXECUTOR"] == "local" and values["GPUS_PER_NODE"] > 0 and sources["GPUS_PER_NODE"] != SOURCE_CLI:
        gpus = probe()
        if gpus:
            values["GPUS_PER_NODE"], sources["GPUS_PER_NODE"] = len(gpus), SOURCE_PROBE
            memory = min(gpu.memory_gb for gpu in gpus)
            if memory > 0 and sources["GPU_MEMORY_GB"] != SOURCE_CLI:
                values["GPU_MEMORY_GB"], sources["GPU_MEMORY_GB"] = memory, SOURCE_PROBE

    if values["MODEL_TAG"] is None:
        values["MODEL_TAG"], sources["MODEL_TAG"] = f"d{values['DEPTH']}", "default: d<depth>"
    check_model_tag(values["MODEL_TAG"])

    memory_gb = values["GPU_MEMORY_GB"]
    batch_from_profile = sources["DEVICE_BATCH_SIZE"] in (SOURCE_DEFAULT, f"env/{site}.env")
    if 0 < memory_gb <= SMALL_GPU_GB and batch_from_profile and values["DEVICE_BATCH_SIZE"] > 1:
        old = values["DEVICE_BATCH_SIZE"]
        values["DEVICE_BATCH_SIZE"], sources["DEVICE_BATCH_SIZE"] = old // 2, SOURCE_ADJUSTED
        notes.append(f"GPUs have {memory_gb:g} GB: device batch {old} -> {old // 2}, gradient accumulation "
                     f"doubles (total batch unchanged); set DEVICE_BATCH_SIZE to choose yourself")

    sections: dict[str, dict] = {"site": {"name": site}, "slurm": {}, "run": {}}
    for name, (section, attr) in KEY_FIELDS.items():
        sections[section][attr] = values[name]
    profile = SiteProfile(**sections["site"])
    slurm = SlurmSettings(**sections["slurm"])
    run = RunSettings(**sections["run"])

    threads = values["OMP_NUM_THREADS"]
    if threads == "auto":
        cores = slurm.cpus_per_task if profile.executor == "slurm" else cpu_count()
        values["OMP_NUM_THREADS"] = str(max(1, cores // profile.processes_per_node))
        sources["OMP_NUM_THREADS"] += " (auto: cores / processes per node)"
    stage_env = {"NANOCHAT_BASE_DIR": str(profile.cache_dir)}
    for name, value in values.items():
        if (name in K.KEYS_BY_NAME and K.KEYS_BY_NAME[name].group == K.ENV) or K.is_pass_through_env(name):
            if value is not None:
                stage_env[name] = str(value)
    return LaunchConfig(site=profile, slurm=slurm, run=run, stage_env=stage_env,
                        price_per_gpu_hour=values["PRICE_PER_GPU_HOUR"], values=values, sources=sources,
                        notes=tuple(notes))


def format_config(config: LaunchConfig) -> str:
    """Every resolved value with its source, grouped as in launch.keys; pass-through variables last."""
    lines = [f"site {config.site.name}"]
    for group, title in K.GROUP_TITLES.items():
        lines.append(f"[{title}]")
        for key in (k for k in K.KEYS if k.group == group):
            value = config.values[key.name]
            shown = "(unset)" if value is None else str(value)
            lines.append(f"  {key.name:<32} {shown:<40} [{config.sources[key.name]}]")
    extra = sorted(name for name in config.values if name not in K.KEYS_BY_NAME)
    if extra:
        lines.append("[pass-through environment]")
        lines.extend(f"  {name:<32} {config.values[name]!s:<40} [{config.sources[name]}]" for name in extra)
    lines.extend(f"note: {note}" for note in config.notes)
    return "\n".join(lines)
