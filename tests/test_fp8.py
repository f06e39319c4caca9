"""FP8 block matmuls (torch._scaled_mm runs on CPU too): scaling, forward and gradient error bounds,
conversion bookkeeping, refusals; and fp8 vs bf16 training loss on CUDA."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.configargs import UsageError
from nanochat.fp8 import (
    E4M3,
    E5M2,
    Float8Linear,
    check_fp8_support,
    convert_blocks_to_fp8,
    float8_linear,
    to_float8,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import apply_precision, autocast_precision


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small_gpt(n_embd=64, n_layer=2):
    config = GPTConfig(sequence_len=32, vocab_size=128, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=n_embd)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name:
                param.normal_(0, param.size(1) ** -0.5)
    return model


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_to_float8_uses_the_full_range_and_round_trips(dtype):
    x = torch.randn(64, 64) * 3
    scaled, inv = to_float8(x, dtype)
    assert scaled.dtype == dtype
    assert scaled.float().abs().max().item() == torch.finfo(dtype).max
    tolerance = 0.04 if dtype == E4M3 else 0.08
    assert rel_err(scaled.float() * inv, x) < tolerance


def test_float8_linear_forward_and_gradients_are_close_to_float32():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    w = (torch.randn(96, 64) / 8).requires_grad_(True)
    out = float8_linear(x, w)
    ref = F.linear(x, w)
    assert out.shape == (4, 32, 96)
    assert rel_err(out, ref) < 0.06
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, [x, w], grad)
    rx, rw = torch.autograd.grad(ref, [x, w], grad)
    assert gw.dtype == torch.float32
    assert rel_err(gx, rx) < 0.12 and rel_err(gw, rw) < 0.12


def test_float8_linear_needs_aligned_rows():
    with pytest.raises(ValueError, match="multiple of 16"):
        float8_linear(torch.randn(3, 64), torch.randn(32, 64))


def test_conversion_counts_block_linears_keeps_state_dict_and_evaluates_in_plain_precision():
    model = small_gpt()
    keys = list(model.state_dict())
    assert convert_blocks_to_fp8(model.transformer.h) == 2 * 6
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is nn.Linear
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, Float8Linear)
    x = torch.randn(16, 64)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.train()
    assert not torch.equal(layer(x), F.linear(x, layer.weight))


def test_fp8_training_loss_is_close_to_float32_on_cpu():
    model = small_gpt()
    idx = torch.randint(0, 128, (2, 32))
    reference = model(idx, idx)
    convert_blocks_to_fp8(model.transformer.h)
    loss = model(idx, idx)
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    loss.backward()
    assert all(p.grad is not None for p in model.transformer.h.parameters())


def test_fp8_refused_before_hopper_and_off_cuda():
    with pytest.raises(UsageError, match="Hopper or Blackwell"):
        check_fp8_support("NVIDIA A100", (8, 0))
    check_fp8_support("NVIDIA H100", (9, 0))
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        apply_precision(small_gpt(), "fp8", "cpu")


def test_apply_precision_counts_and_refuses_when_nothing_converts():
    report = apply_precision(small_gpt(), "fp8", "cuda", "NVIDIA H100", (9, 0))
    assert (report.converted_layers, report.block_linear_layers) == (12, 12)
    assert "12 of 12" in report.describe()
    assert apply_precision(small_gpt(), "bf16", "cuda").converted_layers == 0
    with pytest.raises(UsageError, match="no block linear layer could be converted"):
        apply_precision(small_gpt(n_embd=24), "fp8", "cuda", "NVIDIA H100", (9, 0))


def test_autocast_precision_mapping():
    assert [autocast_precision(p) for p in ("auto", "bf16", "fp32", "fp8", "nvfp4")] == \
        ["auto", "bf16", "fp32", "bf16", "bf16"]
    with pytest.raises(UsageError, match="--precision"):
        autocast_precision("fp16")


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="needs a Hopper or Blackwell GPU")
def test_fp8_loss_close_to_bf16_compiled_on_cuda():
    model = small_gpt(n_embd=256, n_layer=4).cuda()
    idx = torch.randint(0, 128, (8, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = torch.compile(model, fullgraph=True)(idx, idx)
        torch._dynamo.reset()
        convert_blocks_to_fp8(model.transformer.h)
        loss = torch.compile(model, fullgraph=True)(idx, idx)
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.transformer.h.parameters())
