"""Every setting a site file, `.env.local` or `--set` may hold: its name, type, default and meaning.

The launcher refuses any key not listed here, naming the closest valid key, so that a typo such as
`SBATCH_ACOUNT` fails on the login node instead of silently using the cluster default. SLURM keys use
sbatch's own input-variable names (`SBATCH_ACCOUNT`, `SBATCH_PARTITION`, ...), so sourcing `.env.local`
before a plain `sbatch` applies them as well. `ENV` keys are exported to every stage's environment.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from nanochat.configargs import UsageError

SITE, MODEL, SLURM, PERSONAL, ENV = "site", "model", "slurm", "personal", "env"
GROUP_TITLES = {
    SITE: "site", MODEL: "model and run", SLURM: "slurm", PERSONAL: "personal", ENV: "stage environment",
}
PASS_THROUGH_ENV_PREFIXES = ("NCCL_",)


@dataclass(frozen=True)
class Key:
    """One setting. `kind` is int, float, str or bool; `choices` limits str values; "" means unset."""

    name: str
    group: str
    kind: type
    default: str
    help: str
    choices: tuple[str, ...] = ()
    cli_flag: str = ""

    def parse(self, text: str, origin: str):
        """The typed value of `text`, or None for an empty (unset) value; bad text is a UsageError."""
        text = text.strip()
        if text == "":
            return None
        if self.choices and text not in self.choices:
            raise UsageError(f"{self.name}={text!r} in {origin}: expected one of {', '.join(self.choices)}")
        try:
            if self.kind is bool:
                lowered = text.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                return lowered in ("1", "true", "yes")
            value = self.kind(text)
        except ValueError:
            raise UsageError(f"{self.name}={text!r} in {origin}: expected {self.kind.__name__}") from None
        if self.kind is float and not math.isfinite(value):
            raise UsageError(f"{self.name}={text!r} in {origin}: expected a finite number")
        return value


KEYS: tuple[Key, ...] = (
    Key("EXECUTOR", SITE, str, "local", "where stages run: local processes or a SLURM job", ("local", "slurm")),
    Key("DATA", SITE, str, "demo", "built-in demo corpus or the real datasets", ("demo", "real")),
    Key("NANOCHAT_BASE_DIR", SITE, str, "~/.cache/nanochat", "the cache root ($USER and ~ are expanded)"),
    Key("GPUS_PER_NODE", SITE, int, "0", "GPUs each node runs stages on (0: CPU)"),
    Key("NODES", SITE, int, "1", "nodes per job (more than 1 only under SLURM)"),
    Key("GPU_MEMORY_GB", SITE, float, "0", "memory of one GPU in GB (40 halves the device batch)"),
    Key("DEVICE_TYPE", SITE, str, "cuda", "torch device type for base_train", ("cpu", "cuda", "mps")),
    Key("SHARDS", SITE, int, "240", "pretraining shards the real-data run needs"),
    Key("DEPTH", MODEL, int, "20", "transformer layers; every size follows from it", cli_flag="--depth"),
    Key("ASPECT_RATIO", MODEL, int, "", "model width = depth x aspect ratio (unset: the stage default)",
        cli_flag="--aspect-ratio"),
    Key("HEAD_DIM", MODEL, int, "", "attention head width (unset: the stage default)", cli_flag="--head-dim"),
    Key("MAX_SEQ_LEN", MODEL, int, "2048", "context length in tokens", cli_flag="--max-seq-len"),
    Key("DEVICE_BATCH_SIZE", MODEL, int, "32", "sequences per GPU per micro-step",
        cli_flag="--device-batch-size"),
    Key("TOTAL_BATCH_SIZE", MODEL, int, "524288", "tokens per optimizer step (gradient accumulation fills it)",
        cli_flag="--total-batch-size"),
    Key("VOCAB_SIZE", MODEL, int, "32768", "tokenizer vocabulary", cli_flag="--vocab-size"),
    Key("TOKENIZER_MAX_CHARS", MODEL, int, "", "characters tok_train reads (unset: the stage default)",
        cli_flag="--max-chars"),
    Key("WINDOW_PATTERN", MODEL, str, "L", "attention window per layer, repeated (S: sliding, L: full)",
        cli_flag="--window-pattern"),
    Key("PRECISION", MODEL, str, "bf16", "matmul precision", ("bf16", "fp32"), "--precision"),
    Key("COMPILE", MODEL, bool, "true", "torch.compile the model"),
    Key("BASE_ITERATIONS", MODEL, int, "", "base_train steps (unset: from the param/data ratio)",
        cli_flag="--num-iterations"),
    Key("TARGET_PARAM_DATA_RATIO", MODEL, float, "", "training tokens per parameter (unset: stage default)",
        cli_flag="--target-param-data-ratio"),
    Key("MID_ITERATIONS", MODEL, int, "", "mid_train steps (unset: one epoch)", cli_flag="--mid-iterations"),
    Key("SFT_ITERATIONS", MODEL, int, "", "chat_sft steps (unset: one epoch)", cli_flag="--sft-iterations"),
    Key("RL_ITERATIONS", MODEL, int, "", "chat_rl steps (unset: stage default)", cli_flag="--rl-iterations"),
    Key("EVAL_EVERY", MODEL, int, "", "base_train validation interval in steps", cli_flag="--eval-every"),
    Key("EVAL_TOKENS", MODEL, int, "", "tokens per base_train validation", cli_flag="--eval-tokens"),
    Key("SAVE_EVERY", MODEL, int, "", "base_train checkpoint interval in steps", cli_flag="--save-every"),
    Key("EVAL_MAX_PER_TASK", MODEL, int, "", "examples per eval task (unset: all)", cli_flag="--max-per-task"),
    Key("EVAL_SPLIT_TOKENS", MODEL, int, "", "tokens per split for base_eval bits per byte (unset: stage default)",
        cli_flag="--split-tokens"),
    Key("FINETUNE_EVAL_EVERY", MODEL, int, "", "mid_train/chat_sft validation interval in steps",
        cli_flag="--finetune-eval-every"),
    Key("CHAT_MAX_NEW_TOKENS", MODEL, int, "", "tokens chat_eval generates per answer (unset: stage default)",
        cli_flag="--max-new-tokens"),
    Key("CHAT_EVAL_SOURCE", MODEL, str, "sft", "which chat checkpoint chat_eval scores", ("mid", "sft", "rl"),
        "--chat-eval-source"),
    Key("DEMO_MEGABYTES", MODEL, float, "3", "pretraining text demo_data writes", cli_flag="--pretrain-megabytes"),
    Key("SEED", MODEL, int, "0", "demo corpus seed", cli_flag="--seed"),
    Key("MODEL_TAG", MODEL, str, "", "checkpoint folder name (unset: d<depth>)", cli_flag="--model-tag"),
    Key("RUN_NAME", MODEL, str, "", "wandb run name passed as --run (unset: the stage default)",
        cli_flag="--run"),
    Key("SBATCH_PARTITION", SLURM, str, "", "SLURM partition (unset: the cluster default)"),
    Key("SBATCH_ACCOUNT", SLURM, str, "", "SLURM account to charge (unset: your default account)"),
    Key("SBATCH_TIMELIMIT", SLURM, str, "12:00:00", "wall-clock limit per job, [D-]HH:MM:SS"),
    Key("CPUS_PER_TASK", SLURM, int, "32", "CPU cores per node (one task per node)"),
    Key("SBATCH_MEM_PER_NODE", SLURM, str, "", "memory per node, e.g. 256G; 0 = all (unset: cluster default)"),
    Key("SBATCH_MAIL_USER", PERSONAL, str, "", "address SLURM mails job events to"),
    Key("SBATCH_MAIL_TYPE", PERSONAL, str, "", "which events to mail, e.g. END,FAIL or ALL"),
    Key("SIGNAL_LEAD_SECONDS", SLURM, int, "300", "seconds before the time limit SLURM signals a save"),
    Key("MAX_REQUEUES", SLURM, int, "20", "times a job may requeue itself after its time limit"),
    Key("NANOCHAT_SITE", PERSONAL, str, "", "site to use when --site is omitted"),
    Key("PRICE_PER_GPU_HOUR", PERSONAL, float, "", "your cost of one GPU-hour; the launcher prints run cost"),
    Key("WANDB_PROJECT", ENV, str, "", "wandb project"),
    Key("WANDB_ENTITY", ENV, str, "", "wandb team or user"),
    Key("WANDB_MODE", ENV, str, "", "wandb mode", ("online", "offline", "disabled")),
    Key("OMP_NUM_THREADS", ENV, str, "auto", "CPU threads per process; auto = usable cores / processes"),
    Key("PYTORCH_ALLOC_CONF", ENV, str, "", "CUDA caching allocator settings"),
    Key("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", ENV, str, "", "let inductor autotune matmuls"),
    Key("TRITON_PTXAS_PATH", ENV, str, "", "ptxas that knows this GPU (GB10 needs CUDA 13's)"),
    Key("HF_HUB_OFFLINE", ENV, str, "", "1: never contact the Hugging Face hub"),
    Key("HF_DATASETS_OFFLINE", ENV, str, "", "1: datasets reads only its cache"),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}


def is_pass_through_env(name: str) -> bool:
    return name.startswith(PASS_THROUGH_ENV_PREFIXES)


def check_known(names, origin: str) -> None:
    """UsageError for the first unknown key, naming the closest valid one."""
    for name in names:
        if name in KEYS_BY_NAME or is_pass_through_env(name):
            continue
        close = difflib.get_close_matches(name, list(KEYS_BY_NAME), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else "; see env/example.env.local for the valid keys"
        raise UsageError(f"unknown key {name} in {origin}{hint}")
