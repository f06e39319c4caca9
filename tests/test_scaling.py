"""derive(): model shape, analytic parameter counts, batch arithmetic, training horizon and its errors."""

import pytest
import torch

from nanochat.configargs import UsageError
from nanochat.gpt import GPT
from nanochat.scaling import count_params, derive


@pytest.mark.parametrize("depth,kv_ratio,pattern,head_dim", [(1, 1, "L", 64), (3, 1, "SL", 128), (4, 2, "SSSL", 32),
                                                              (12, 1, "L", 128), (20, 2, "SSL", 128)])
def test_analytic_params_and_flops_match_the_model(depth, kv_ratio, pattern, head_dim):
    derived = derive(depth, head_dim=head_dim, n_kv_head_ratio=kv_ratio, window_pattern=pattern, max_seq_len=256,
                     vocab_size=1000, device_batch_size=1, total_batch_size=256)
    with torch.device("meta"):
        model = GPT(derived.model_config)
    counts = model.param_counts()
    assert derived.params.total == model.num_params() == counts["total"]
    assert (derived.params.embedding, derived.params.lm_head, derived.params.matrices, derived.params.scalars) == (
        counts["embedding"], counts["lm_head"], counts["matrices"], counts["scalars"])
    assert derived.flops_per_token == model.estimate_flops()
    assert count_params(derived.model_config) == derived.params


def hand_iterations(depth: int, dim: int, ratio: float = 20.0, vocab: int = 32768, batch: int = 524288) -> int:
    scaling_params = depth * 12 * dim * dim + vocab * dim  # block matrices (no GQA) + lm_head
    return int(ratio * scaling_params) // batch


@pytest.mark.parametrize("depth,dim,heads,iterations", [(4, 256, 2, 440), (12, 768, 6, 4200), (20, 1280, 10, 16600)])
def test_derive_reference_depths(depth, dim, heads, iterations):
    derived = derive(depth)
    assert (derived.model_dim, derived.n_head, derived.n_kv_head, derived.head_dim) == (dim, heads, heads, 128)
    config = derived.model_config
    assert (config.n_layer, config.n_embd, config.sequence_len, config.vocab_size) == (depth, dim, 2048, 32768)
    assert derived.grad_accum_steps == 524288 // (32 * 2048) == 8
    assert derived.num_iterations == iterations == hand_iterations(depth, dim)
    assert derived.horizon_source == "target_param_data_ratio"
    assert derived.total_tokens == iterations * 524288
    assert derived.total_flops == derived.flops_per_token * derived.total_tokens
    assert derived.adamw_lr_scale == pytest.approx((dim / 768) ** -0.5)
    lines = derived.describe()
    assert all(isinstance(line, str) and line for line in lines)
    assert any(f"{iterations:,} iterations" in line for line in lines)


def test_model_dim_rounds_up_to_head_dim_and_world_size_shrinks_accumulation():
    derived = derive(3, world_size=8, device_batch_size=16)
    assert derived.model_dim == 256 and derived.n_head == 2  # 3 * 64 = 192 rounded up to 2 * 128
    assert derived.grad_accum_steps == 524288 // (16 * 2048 * 8) == 2
    assert derive(5, aspect_ratio=64, head_dim=64).model_dim == 320


def test_horizon_priority():
    by_iterations = derive(4, num_iterations=7, target_flops=1e18, target_param_data_ratio=5)
    assert (by_iterations.num_iterations, by_iterations.horizon_source) == (7, "num_iterations")
    reference = derive(4)
    by_flops = derive(4, target_flops=reference.flops_per_token * 524288 * 100, target_param_data_ratio=5)
    assert (by_flops.num_iterations, by_flops.horizon_source) == (100, "target_flops")
    assert derive(4, target_param_data_ratio=10).num_iterations == hand_iterations(4, 256, ratio=10)


def test_gqa_and_window_pattern_pass_through():
    derived = derive(12, n_kv_head_ratio=3, window_pattern="SSSL")
    assert derived.n_head == 6 and derived.n_kv_head == 2
    assert derived.model_config.window_pattern == "SSSL"
    assert derived.model_config.layer_windows()[-1] is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=0), "depth must be positive"),
    (dict(depth=-3), "depth must be positive"),
    (dict(depth=4, aspect_ratio=0), "aspect_ratio"),
    (dict(depth=4, head_dim=63), "even"),
    (dict(depth=4, world_size=0), "world_size"),
    (dict(depth=4, device_batch_size=3), "--total-batch-size"),
    (dict(depth=4, world_size=3), "not a multiple"),
    (dict(depth=12, n_kv_head_ratio=4), "n-kv-head-ratio"),
    (dict(depth=4, window_pattern="LX"), "window_pattern"),
    (dict(depth=4, target_param_data_ratio=0), "no training horizon"),
    (dict(depth=4, target_flops=1.0), "under one iteration"),
    (dict(depth=4, target_flops=float("inf")), "target_flops must be a finite number, got inf; pass a finite "
                                               "--target-flops"),
    (dict(depth=4, target_flops=float("nan")), "target_flops must be a finite number, got nan"),
    (dict(depth=4, target_param_data_ratio=float("inf")), "pass a finite --target-param-data-ratio"),
])
def test_derive_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        derive(**kwargs)
    assert issubclass(UsageError, ValueError)
