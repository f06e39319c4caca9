"""Loss kernels: dispatch and the missing-liger error on CPU; liger vs native loss and gradients (with
ignored targets, the softcap, and under torch.compile without graph breaks) on CUDA."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanochat import kernels
from nanochat.configargs import UsageError
from nanochat.gpt import GPT, GPTConfig
from nanochat.kernels import linear_cross_entropy, use_kernel

needs_liger = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.liger_installed()),
                                 reason="needs a CUDA GPU and liger-kernel")


def reference_loss(hidden, weight, targets, cap, reduction):
    logits = (hidden.double() @ weight.double().t())
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction=reduction)


def test_unknown_kernel_is_a_usage_error():
    with pytest.raises(UsageError, match="native, liger"):
        use_kernel("triton")
    with pytest.raises(UsageError, match="native, liger"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 15.0,
                             kernel="fast")


def test_missing_liger_names_the_install_command(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(UsageError, match=r'pip install -e "\.\[gpu\]"'):
        use_kernel("liger")
    model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=8))
    with pytest.raises(UsageError, match="liger-kernel"):
        model.set_loss_kernel("liger")
    assert model.loss_kernel == "native"


def test_use_kernel_liger_turns_on_scalar_capture(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", False)
    assert use_kernel("liger") == "liger"
    assert torch._dynamo.config.capture_scalar_outputs is True


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_native_kernel_matches_softcapped_reference_with_ignored_targets(reduction):
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (3, 5))
    targets[0, :2] = -1
    got = linear_cross_entropy(hidden, weight, targets, 2.0, reduction)
    expected = reference_loss(hidden, weight, targets, 2.0, reduction)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert got.shape == (15,) and torch.all(got.view(3, 5)[0, :2] == 0)


def weighted_total(loss):
    """A scalar from a loss of any reduction, weighting per-token losses unevenly (as RL does)."""
    if loss.dim() == 0:
        return 0.7 * loss
    return (loss * torch.linspace(0.1, 1.5, loss.numel(), dtype=loss.dtype)).sum()


def reference_gradients(hidden, weight, targets, cap, reduction):
    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    loss = reference_loss(hidden64, weight64, targets, cap, reduction)
    return loss.detach(), *torch.autograd.grad(weighted_total(loss), [hidden64, weight64])


def ignored_targets_case(vocab=40, shape=(3, 5), dim=16):
    torch.manual_seed(0)
    hidden = torch.randn(*shape, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, shape)
    targets[0, :2] = -1
    return hidden, weight, targets


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_native_gradients_match_reference_with_ignored_targets(reduction, compiled):
    hidden, weight, targets = ignored_targets_case()
    loss_fn = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
    loss = loss_fn(hidden, weight, targets, 2.0, reduction)
    grads = torch.autograd.grad(weighted_total(loss), [hidden, weight])
    expected_loss, *expected_grads = reference_gradients(hidden, weight, targets, 2.0, reduction)
    assert torch.allclose(loss.detach().double(), expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_training_losses_compute_the_logit_gradient_in_the_forward_pass(reduction):
    hidden, weight, targets = ignored_targets_case()
    assert "EarlyGradient" in type(linear_cross_entropy(hidden, weight, targets, 2.0, reduction).grad_fn).__name__
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets, 2.0, reduction).grad_fn is None
    frozen = linear_cross_entropy(hidden.detach(), weight.detach(), targets, 2.0, reduction)
    assert frozen.grad_fn is None


def test_fused_cuda_loss_only_for_cuda_tensors_and_softcaps_it_can_hold():
    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert kernels._fused_kernel_applies(on_cuda, 15.0) == kernels._TRITON_INSTALLED
    assert kernels._fused_kernel_applies(on_cuda, kernels.FUSED_MAX_SOFTCAP) == kernels._TRITON_INSTALLED
    assert not kernels._fused_kernel_applies(on_cuda, kernels.FUSED_MAX_SOFTCAP + 10.0)
    assert not kernels._fused_kernel_applies(on_cpu, 15.0)


@pytest.mark.parametrize("compiled", [False, True])
def test_native_gradients_under_bf16_autocast_keep_the_parameter_dtypes(compiled):
    hidden, weight, targets = ignored_targets_case(vocab=256, shape=(4, 32), dim=64)
    loss_fn = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(hidden, weight, targets, 15.0, "mean")
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    assert grad_hidden.dtype == hidden.dtype and grad_weight.dtype == weight.dtype
    expected_loss, *expected = reference_gradients(hidden, weight, targets, 15.0, "mean")
    expected = [grad / 0.7 for grad in expected]
    assert abs(loss.item() - expected_loss.item()) < 2e-2 * expected_loss.item()
    for got, want in zip((grad_hidden, grad_weight), expected):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


def test_gpt_forward_uses_the_selected_kernel(monkeypatch):
    calls = []

    def fake(hidden, weight, targets, softcap, reduction, kernel):
        calls.append((kernel, softcap, reduction))
        return torch.zeros(targets.numel()) if reduction == "none" else torch.zeros(())

    import nanochat.gpt as gpt

    monkeypatch.setattr(gpt, "linear_cross_entropy", fake)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=8,
                          logit_softcap=7.0))
    model.init_weights()
    model.set_loss_kernel("liger")
    idx = torch.randint(0, 16, (2, 8))
    assert model(idx, idx, loss_reduction="none").shape == (2, 8)
    assert calls == [("liger", 7.0, "none")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_native_bf16_compiled_loss_and_gradients_match_reference_on_cuda():
    torch.manual_seed(0)
    hidden = torch.randn(4, 512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(8192, 256, device="cuda") * 0.05).requires_grad_(True)
    targets = torch.randint(0, 8192, (4, 512), device="cuda")
    targets[:, :37] = -1
    loss_fn = torch.compile(linear_cross_entropy, fullgraph=True, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(hidden, weight, targets, 15.0, "mean")
    grads = torch.autograd.grad(weighted_total(loss), [hidden, weight])
    expected_loss, *expected = reference_gradients(hidden, weight, targets, 15.0, "mean")
    assert abs(loss.item() - expected_loss.item()) < 2e-3 * expected_loss.item()
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


@needs_liger
@pytest.mark.parametrize("compiled", [False, True])
def test_liger_matches_native_loss_and_gradients_on_cuda(compiled):
    torch.manual_seed(0)
    hidden = torch.randn(4, 512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(8192, 256, device="cuda") * 0.05).requires_grad_(True)
    targets = torch.randint(0, 8192, (4, 512), device="cuda")
    targets[:, :37] = -1
    use_kernel("liger")

    def run(kernel):
        fn = lambda h, w, t: linear_cross_entropy(h, w, t, 15.0, "mean", kernel)  # noqa: E731
        if compiled:  # liger 0.8.5 does not trace under fullgraph (H100 run, 2026-11-21): the isolated fallback
            kernels.isolate_liger_from_compile(kernel == "liger")
            fn = torch.compile(fn, dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets)
        return (loss.detach(), *torch.autograd.grad(loss, [hidden, weight]))

    try:
        liger, native = run("liger"), run("native")
    finally:
        kernels.isolate_liger_from_compile(False)
    assert abs(liger[0].item() - native[0].item()) < 2e-3 * native[0].item()
    for got, ref in zip(liger[1:], native[1:]):
        assert ((got - ref).norm() / ref.norm()).item() < 3e-2
