"""The fused softcap cross-entropy kernel against a float64 reference: losses, logit gradients, ignored
targets, a vocabulary that is not a multiple of the block, saturated and extreme logits, and the whole
head loss (forward, backward, torch.compile) routed through it. On a machine without CUDA the Triton
kernel runs in Triton's interpreter on CPU tensors."""

import os

import pytest
import torch
import torch.nn.functional as F

from nanochat import kernels
from nanochat.kernels import linear_cross_entropy

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without CUDA the kernel needs TRITON_INTERPRET=1 from before triton's import (tests/conftest.py)",
                allow_module_level=True)
import nanochat.softcap_loss_triton as softcap_loss_triton  # noqa: E402


def reference(logits, targets, token_weights, cap):
    logits = logits.double().requires_grad_(True)
    losses = F.cross_entropy(cap * torch.tanh(logits / cap), targets, ignore_index=-1, reduction="none")
    losses.backward(token_weights.double())
    return losses.detach(), logits.grad


def case(rows=7, dim=16, vocab=5000, logit_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=generator) * logit_scale
    weight = torch.randn(vocab, dim, generator=generator) / dim ** 0.5
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[2] = -1
    token_weights = (targets != -1).float() / (targets != -1).sum()
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), token_weights.to(DEVICE)


@pytest.fixture(params=[4096, 1024])
def row_walk(request, monkeypatch):
    """Rows of 5000 logits walked in two blocks, or in five (the last one partly outside the row)."""
    monkeypatch.setattr(softcap_loss_triton, "_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("logit_scale", [1.0, 40.0])
def test_losses_and_gradients_match_the_reference(logit_scale, row_walk):
    hidden, weight, targets, token_weights = case(logit_scale=logit_scale)
    losses, grad = softcap_loss_triton.softcap_head_loss(hidden, weight, targets, token_weights, 15.0)
    expected_losses, expected_grad = reference(hidden @ weight.t(), targets, token_weights, 15.0)
    assert losses.dtype == torch.float32 and grad.shape == (7, 5000)
    assert torch.allclose(losses.double(), expected_losses, rtol=1e-5, atol=1e-5)
    assert losses[2] == 0 and torch.all(grad[2] == 0)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-8)


def test_largest_softcap_with_every_logit_at_the_floor_stays_finite(row_walk):
    hidden, weight, targets, token_weights = case(rows=3, vocab=3000)
    weight = torch.ones_like(weight)
    hidden = -torch.ones_like(hidden) * 100.0
    cap = kernels.FUSED_MAX_SOFTCAP
    losses, grad = softcap_loss_triton.softcap_head_loss(hidden, weight, targets, token_weights, cap)
    expected_losses, _ = reference(hidden @ weight.t(), targets, token_weights, cap)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert torch.allclose(losses.double(), expected_losses, rtol=1e-4)


def test_a_softcap_beyond_the_kernel_range_is_refused():
    hidden, weight, targets, token_weights = case(rows=3, vocab=64)
    with pytest.raises(ValueError, match="softcap must be in"):
        softcap_loss_triton.softcap_head_loss(hidden, weight, targets, token_weights, 50.0)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_head_loss_through_the_kernel_matches_the_pytorch_path(monkeypatch, reduction, compiled):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    weight = (torch.randn(4100, 32, device=DEVICE) * 0.2).requires_grad_(True)
    targets = torch.randint(0, 4100, (2, 9), device=DEVICE)
    targets[1, :4] = -1

    def loss_and_grads(fused):
        monkeypatch.setattr(kernels, "_fused_kernel_applies", lambda h, cap: fused)
        loss_fn = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
        loss = loss_fn(hidden, weight, targets, 15.0, reduction)
        torch._dynamo.reset()
        return loss.detach(), *torch.autograd.grad(loss * 0.5, [hidden, weight])

    fused, plain = loss_and_grads(True), loss_and_grads(False)
    for got, want in zip(fused, plain):
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
