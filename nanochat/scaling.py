"""Every consequence of `--depth` in one pure function, so a run's shape can be read (and logged) in one place.

`derive(depth, ...)` turns the depth and a few knobs into the model width and heads, the `GPTConfig`, the
parameter counts (computed analytically, no model is built), the FLOPs per token, the gradient accumulation
steps and the training horizon. Bad input raises `UsageError` (a ValueError) naming the fix.

Training horizon, first one set wins: `num_iterations` > 0, else `target_flops` > 0 (iterations =
round(target_flops / (flops_per_token * total_batch_size))), else `target_param_data_ratio` > 0
(tokens = ratio * scaling params, iterations = tokens // total_batch_size). The scaling params are the
block matrices plus lm_head: embedding and the per-layer scalars are left out, as nanochat does, because
that count gives the cleanest scaling laws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanochat.configargs import UsageError
from nanochat.gpt import GPTConfig, adamw_lr_scale, attention_flops_per_token


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int
    matrices: int
    scalars: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.matrices + self.scalars

    @property
    def scaling(self) -> int:
        """The count the data:param ratio refers to: block matrices + lm_head."""
        return self.matrices + self.lm_head


@dataclass(frozen=True)
class DerivedHyperparams:
    depth: int
    aspect_ratio: int
    model_dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    model_config: GPTConfig
    params: ParamCounts
    flops_per_token: float
    adamw_lr_scale: float
    device_batch_size: int
    world_size: int
    total_batch_size: int
    tokens_per_micro_step: int
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str
    total_tokens: int
    total_flops: float

    def describe(self) -> list[str]:
        """Human-readable lines for the log and the report."""
        p = self.params
        sources = {
            "num_iterations": "set by --num-iterations",
            "target_flops": "from --target-flops",
            "target_param_data_ratio": "from --target-param-data-ratio",
        }
        return [
            f"depth {self.depth} x aspect ratio {self.aspect_ratio} -> model_dim {self.model_dim} "
            f"(rounded up to a multiple of head_dim {self.head_dim})",
            f"heads: {self.n_head} query, {self.n_kv_head} key/value, head_dim {self.head_dim}; "
            f"window pattern {self.model_config.window_pattern!r}, short window {self.model_config.short_window}",
            f"params: {p.total:,} total = {p.embedding:,} embedding + {p.lm_head:,} lm_head + "
            f"{p.matrices:,} matrices + {p.scalars:,} scalars; scaling params {p.scaling:,}",
            f"FLOPs per token (fwd+bwd): {self.flops_per_token:.4e}",
            f"AdamW (embedding, lm_head) lr scale (model_dim/768)^-0.5 = {self.adamw_lr_scale:.6f}",
            f"batch: {self.total_batch_size:,} tokens = {self.device_batch_size} rows x "
            f"{self.model_config.sequence_len} tokens x {self.world_size} ranks x {self.grad_accum_steps} "
            "accumulation steps",
            f"horizon: {self.num_iterations:,} iterations ({sources[self.horizon_source]}), "
            f"{self.total_tokens:,} tokens, tokens:scaling-params {self.total_tokens / p.scaling:.2f}",
            f"total training FLOPs: {self.total_flops:.4e}",
        ]


def count_params(config: GPTConfig) -> ParamCounts:
    """Parameter counts of `nanochat.gpt.GPT(config)`, from the shapes alone."""
    d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    per_layer = d * d + 2 * d * kv_dim + d * d + 2 * (4 * d * d)  # q, k+v, attn proj, mlp fc + proj
    return ParamCounts(
        embedding=config.vocab_size * d,
        lm_head=config.vocab_size * d,
        matrices=config.n_layer * per_layer,
        scalars=2 * config.n_layer,
    )


def _require_positive(**values) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}; pass --{name.replace('_', '-')} > 0")


def derive(depth: int, *, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
           vocab_size: int = 32768, n_kv_head_ratio: int = 1, window_pattern: str = "L",
           device_batch_size: int = 32, world_size: int = 1, total_batch_size: int = 524288,
           num_iterations: int = -1, target_flops: float = -1.0,
           target_param_data_ratio: float = 20.0) -> DerivedHyperparams:
    """Derive the model shape, batch arithmetic and training horizon from the depth (see module docstring)."""
    _require_positive(depth=depth, aspect_ratio=aspect_ratio, head_dim=head_dim, max_seq_len=max_seq_len,
                      vocab_size=vocab_size, n_kv_head_ratio=n_kv_head_ratio,
                      device_batch_size=device_batch_size, world_size=world_size,
                      total_batch_size=total_batch_size)
    if head_dim % 2:
        raise UsageError(f"head_dim must be even for rotary embeddings, got {head_dim}; pass an even --head-dim")
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = model_dim // head_dim
    if n_head % n_kv_head_ratio:
        raise UsageError(f"n_kv_head_ratio {n_kv_head_ratio} does not divide the {n_head} heads of depth {depth}; "
                         "pass a --n-kv-head-ratio that divides it")
    n_kv_head = n_head // n_kv_head_ratio
    try:
        config = GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                           n_kv_head=n_kv_head, n_embd=model_dim, window_pattern=window_pattern)
    except ValueError as exc:
        raise UsageError(f"invalid model shape: {exc}") from exc
    params = count_params(config)
    flops_per_token = float(6 * params.scaling + attention_flops_per_token(config))

    tokens_per_micro_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % tokens_per_micro_step:
        raise UsageError(
            f"total_batch_size {total_batch_size:,} is not a multiple of device_batch_size x max_seq_len x "
            f"world_size = {device_batch_size} x {max_seq_len} x {world_size} = {tokens_per_micro_step:,}; "
            "pass a --total-batch-size that is, or change --device-batch-size")
    grad_accum_steps = total_batch_size // tokens_per_micro_step

    for name, value in (("target_flops", target_flops), ("target_param_data_ratio", target_param_data_ratio)):
        if not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value}; pass a finite --{name.replace('_', '-')}")
    if num_iterations > 0:
        horizon_source = "num_iterations"
    elif target_flops > 0:
        horizon_source = "target_flops"
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
    elif target_param_data_ratio > 0:
        horizon_source = "target_param_data_ratio"
        num_iterations = int(target_param_data_ratio * params.scaling) // total_batch_size
    else:
        raise UsageError("no training horizon: pass --num-iterations, --target-flops or "
                         "--target-param-data-ratio > 0")
    if num_iterations < 1:
        raise UsageError(f"the horizon from {horizon_source} is under one iteration of {total_batch_size:,} "
                         f"tokens; raise --{horizon_source.replace('_', '-')} or lower --total-batch-size")
    total_tokens = total_batch_size * num_iterations
    return DerivedHyperparams(
        depth=depth, aspect_ratio=aspect_ratio, model_dim=model_dim, n_head=n_head, n_kv_head=n_kv_head,
        head_dim=head_dim, model_config=config, params=params, flops_per_token=flops_per_token,
        adamw_lr_scale=adamw_lr_scale(model_dim), device_batch_size=device_batch_size, world_size=world_size,
        total_batch_size=total_batch_size, tokens_per_micro_step=tokens_per_micro_step,
        grad_accum_steps=grad_accum_steps, num_iterations=num_iterations, horizon_source=horizon_source,
        total_tokens=total_tokens, total_flops=flops_per_token * total_tokens,
    )
