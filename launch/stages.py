"""The pipeline as data: each stage's module, the cache inputs it needs, what it produces, its flags.

Artifacts are named strings: "shards", "tokenizer", "eval_bundle", "tasks", "hf:<dataset>" (real data;
the demo corpus's task files stand in for them) and "ckpt:<phase>". Preflight checks a stage's needs
against the cache unless an earlier requested stage produces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.configargs import UsageError

SMOLTALK, MMLU, GSM8K, ARC, HUMANEVAL = (
    "HuggingFaceTB/smol-smoltalk", "cais/mmlu", "openai/gsm8k", "allenai/ai2_arc", "openai/openai_humaneval",
)
CHECKPOINT_PHASE = {"base": "base", "mid": "mid", "sft": "chatsft", "rl": "chatrl"}


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    needs: tuple[str, ...]
    produces: tuple[str, ...]
    flags: tuple[tuple[str, str], ...]  # (flag, RunSettings field); None values are left out
    distributed: bool = False  # runs under torchrun on GPU sites
    optional: bool = False  # only when named in --stages
    demo_only: bool = False

    @property
    def command_module(self) -> str:
        return f"scripts.{self.module}"

    @property
    def saves_checkpoints(self) -> bool:
        """A training stage: a stop signal makes it save a checkpoint and exit 75. Every other stage has
        nothing to save (it ignores SIGUSR1/2) and simply runs again on the rerun."""
        return any(product.startswith("ckpt:") for product in self.produces)


STAGES: tuple[Stage, ...] = (
    Stage("demo_data", "demo_data", (), ("shards", "tasks"),
          (("--pretrain-megabytes", "demo_megabytes"), ("--seed", "seed")), demo_only=True),
    Stage("tok_train", "tok_train", ("shards",), ("tokenizer",),
          (("--vocab-size", "vocab_size"), ("--max-chars", "tokenizer_max_chars"))),
    Stage("tok_eval", "tok_eval", ("tokenizer",), (), ()),
    Stage("base_train", "base_train", ("shards", "tokenizer"), ("ckpt:base",),
          (("--depth", "depth"), ("--aspect-ratio", "aspect_ratio"), ("--head-dim", "head_dim"),
           ("--max-seq-len", "max_seq_len"), ("--device-batch-size", "device_batch_size"),
           ("--total-batch-size", "total_batch_size"), ("--num-iterations", "base_iterations"),
           ("--target-param-data-ratio", "target_param_data_ratio"), ("--window-pattern", "window_pattern"),
           ("--precision", "precision"), ("--compile", "compile"),
           ("--device-type", "device_type"), ("--model-tag", "model_tag"), ("--run", "run_name"),
           ("--eval-every", "eval_every"), ("--eval-tokens", "eval_tokens"), ("--save-every", "save_every")),
          distributed=True),
    Stage("base_eval", "base_eval", ("ckpt:base", "tokenizer", "eval_bundle"), (),
          (("--model-tag", "model_tag"), ("--device-batch-size", "device_batch_size"),
           ("--max-per-task", "eval_max_per_task"), ("--split-tokens", "eval_split_tokens")), distributed=True),
    Stage("mid_train", "mid_train", ("ckpt:base", "tokenizer", f"hf:{SMOLTALK}", f"hf:{MMLU}", f"hf:{GSM8K}"),
          ("ckpt:mid",),
          (("--device-batch-size", "device_batch_size"), ("--num-iterations", "mid_iterations"),
           ("--model-tag", "model_tag"), ("--run", "run_name"), ("--eval-every", "finetune_eval_every")),
          distributed=True),
    Stage("chat_sft", "chat_sft", ("ckpt:mid", "tokenizer", f"hf:{SMOLTALK}", f"hf:{ARC}", f"hf:{GSM8K}"),
          ("ckpt:sft",),
          (("--device-batch-size", "device_batch_size"), ("--num-iterations", "sft_iterations"),
           ("--model-tag", "model_tag"), ("--run", "run_name"), ("--eval-every", "finetune_eval_every")),
          distributed=True),
    Stage("chat_rl", "chat_rl", ("ckpt:sft", "tokenizer", f"hf:{GSM8K}"), ("ckpt:rl",),
          (("--num-iterations", "rl_iterations"), ("--model-tag", "model_tag")), distributed=True, optional=True),
    Stage("chat_eval", "chat_eval", ("ckpt:<source>", "tokenizer", f"hf:{MMLU}", f"hf:{ARC}", f"hf:{GSM8K}",
                                     f"hf:{HUMANEVAL}"), (),
          (("--source", "chat_eval_source"), ("--model-tag", "model_tag"), ("--max-per-task", "eval_max_per_task"),
           ("--max-new-tokens", "chat_max_new_tokens")), distributed=True),
    Stage("report", "report", (), (), ()),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_NAMES = tuple(STAGES_BY_NAME)


def stage_needs(stage: Stage, data: str, chat_eval_source: str) -> tuple[str, ...]:
    """The artifacts `stage` reads for this data source: demo task files replace HF datasets, no eval bundle."""
    needs = []
    for need in stage.needs:
        if need == "ckpt:<source>":
            need = f"ckpt:{chat_eval_source}"
        if data == "demo" and need.startswith("hf:"):
            need = "tasks"
        if data == "demo" and need == "eval_bundle":
            continue
        if need not in needs:
            needs.append(need)
    return tuple(needs)


def default_pipeline(data: str) -> list[str]:
    return [s.name for s in STAGES if not s.optional and (data == "demo" or not s.demo_only)]


def select_stages(data: str, names: str | None = None, start: str | None = None) -> list[str]:
    """Stages to run, in pipeline order: `names` ("a,b,c"), or the default pipeline from `start` on."""
    if names is not None and start is not None:
        raise UsageError("use either --stages or --from, not both")
    if names is not None:
        requested = [name.strip() for name in names.split(",") if name.strip()]
        if not requested:
            raise UsageError(f"--stages {names!r} names no stage; valid stages: {', '.join(STAGE_NAMES)}")
        for name in requested:
            _check_name(name)
            if data == "real" and STAGES_BY_NAME[name].demo_only:
                raise UsageError(f"stage {name} writes the demo corpus; it needs --data demo")
        return [name for name in STAGE_NAMES if name in requested]
    pipeline = default_pipeline(data)
    if start is not None:
        _check_name(start)
        if start not in pipeline:
            raise UsageError(f"stage {start} is not in the {data}-data pipeline ({', '.join(pipeline)}); "
                             f"use --stages {start}")
        return pipeline[pipeline.index(start):]
    return pipeline


def _check_name(name: str) -> None:
    if name not in STAGES_BY_NAME:
        raise UsageError(f"unknown stage {name!r}; valid stages: {', '.join(STAGE_NAMES)}")
