"""Sliding-window kernels (FlexAttention, cuDNN) vs the SDPA reference: mask semantics, forward outputs and
the choice of kernel on CPU; outputs and gradients (eager and under torch.compile) on CUDA."""

import importlib.util
import sys

import pytest
import torch

from nanochat import attention_kernels
from nanochat.attention_kernels import (
    CudnnWindow,
    FlexWindow,
    cudnn_sliding_window_attention,
    cudnn_window_problem,
    flex_sliding_window_attention,
    resolve_window_kernel,
    sliding_window_block_mask,
    sliding_window_mask_mod,
)
from nanochat.configargs import UsageError
from nanochat.gpt import GPT, GPTConfig, attention, attention_mask
from tests.fixtures.models import random_gpt

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cudnn_frontend = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("cudnn") is None,
    reason="needs a CUDA GPU and cudnn-frontend (the [gpu] extra)")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("window", [0, 1, 37, 128, 300])
def test_mask_mod_matches_reference_mask(window):
    T = 256
    q_idx = torch.arange(T)[:, None]
    kv_idx = torch.arange(T)[None, :]
    got = sliding_window_mask_mod(window)(0, 0, q_idx, kv_idx)
    assert torch.equal(got, attention_mask(T, T, window, "cpu"))


def test_block_mask_is_cached_per_length_window_and_device():
    a = sliding_window_block_mask(256, 64, "cpu")
    assert sliding_window_block_mask(256, 64, "cpu") is a
    assert sliding_window_block_mask(256, 32, "cpu") is not a
    assert tuple(a.seq_lengths) == (256, 256)
    dense = a.to_dense()[0, 0]  # (query blocks, key blocks): 1 where a 128x128 tile has any visible pair
    assert dense.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_flex_forward_matches_sdpa_on_cpu(heads, kv_heads):
    torch.manual_seed(0)
    T, window = 256, 50
    q = torch.randn(2, heads, T, 16)
    k, v = torch.randn(2, kv_heads, T, 16), torch.randn(2, kv_heads, T, 16)
    reference = attention(q, k, v, window)
    got = attention(q, k, v, window, kernel=FlexWindow(T, window, "cpu"))
    assert rel_err(got, reference) < 1e-5


def test_flex_kernel_of_another_length_falls_back_to_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    wrong_length = FlexWindow(256, 8, "cpu")
    assert not wrong_length.accepts(q, k)
    assert torch.equal(attention(q, k, v, 8, kernel=wrong_length), attention(q, k, v, 8))


def test_cudnn_kernel_declines_what_cudnn_cannot_run():
    kernel = CudnnWindow(8)
    q = torch.randn(1, 2, 64, 16, dtype=torch.bfloat16)
    assert not kernel.accepts(q, q)  # a CPU tensor
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    assert torch.equal(attention(q, k, v, 8, kernel=kernel), attention(q, k, v, 8))


def test_auto_off_cuda_is_the_reference_and_explicit_kernels_need_cuda():
    assert resolve_window_kernel("auto", "cpu", 16) == "sdpa"
    assert resolve_window_kernel("sdpa", "cpu", 16) == "sdpa"
    for name in ("cudnn", "flex"):
        with pytest.raises(UsageError, match="needs a CUDA GPU"):
            resolve_window_kernel(name, "cpu", 16)
    with pytest.raises(UsageError, match="one of auto, cudnn, flex, sdpa"):
        resolve_window_kernel("flash", "cpu", 16)


def test_auto_takes_cudnn_when_its_probe_passes_else_flex_loudly(monkeypatch, capsys):
    monkeypatch.setattr(attention_kernels, "cudnn_window_problem", lambda device, head_dim: None)
    assert resolve_window_kernel("auto", "cuda", 128) == "cudnn"
    assert resolve_window_kernel("cudnn", "cuda", 128) == "cudnn"
    assert resolve_window_kernel("flex", "cuda", 128) == "flex"
    monkeypatch.setattr(attention_kernels, "cudnn_window_problem", lambda device, head_dim: "no cuDNN here")
    assert resolve_window_kernel("auto", "cuda", 128) == "flex"
    assert "WARNING" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no cuDNN here"):
        resolve_window_kernel("cudnn", "cuda", 128)


def test_missing_cudnn_frontend_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", None)  # makes `import cudnn...` raise ImportError
    problem = cudnn_window_problem("cpu", 16)
    assert problem is not None and "pip install -e '.[gpu]'" in problem


def test_window_kernel_only_on_short_window_layers_and_model_output_unchanged():
    config = GPTConfig(sequence_len=256, vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="SL", short_window=40)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    model.eval()
    idx = torch.randint(0, 64, (2, 256))
    with torch.no_grad():
        reference = model(idx)
        assert config.windowed_layers() == 2
        assert model.set_window_kernel("flex") == 2
        assert [type(b.attn.window_kernel) for b in model.transformer.h] == [FlexWindow, type(None)] * 2
        got = model(idx)
        assert rel_err(got, reference) < 1e-5
        assert model.set_window_kernel("cudnn") == 2
        assert torch.equal(model(idx), reference)  # CPU float32: cuDNN declines, the reference runs
        assert model.set_window_kernel("sdpa") == 0
        assert all(b.attn.window_kernel is None for b in model.transformer.h)


def _kernel_on_cuda(name, T, window):
    if name == "flex":
        mask = sliding_window_block_mask(T, window, "cuda")
        return lambda q, k, v: flex_sliding_window_attention(q, k, v, mask)
    assert cudnn_window_problem("cuda", 128) is None
    return lambda q, k, v: cudnn_sliding_window_attention(q, k, v, window)


@pytest.mark.parametrize("name", [pytest.param("flex", marks=cuda), pytest.param("cudnn", marks=cudnn_frontend)])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_window_kernel_outputs_and_gradients_match_sdpa_on_cuda(name, kv_heads):
    torch.manual_seed(0)
    T, window, D = 2048, 512, 128
    shapes = [(2, 8, T, D), (2, kv_heads, T, D), (2, kv_heads, T, D)]
    inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    out = _kernel_on_cuda(name, T, window)(*inputs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    upcast = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = attention(*upcast, window)
    ref_grads = torch.autograd.grad(ref, upcast, grad.double())
    assert rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-2


@pytest.mark.parametrize("name", [pytest.param("flex", marks=cuda), pytest.param("cudnn", marks=cudnn_frontend)])
def test_compiled_gpt_with_window_kernel_matches_sdpa_loss_and_gradients_on_cuda(name):
    config = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                       window_pattern="SSSL")
    model = random_gpt(config).cuda().train()
    idx = torch.randint(0, 512, (4, 1024), device="cuda")
    targets = torch.randint(0, 512, (4, 1024), device="cuda")

    def loss_and_grads(kernel: str):
        assert model.set_window_kernel(resolve_window_kernel(kernel, "cuda", config.head_dim)) == (kernel != "sdpa") * 3
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(idx, targets)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    loss_kernel, grads_kernel = loss_and_grads(name)
    torch._dynamo.reset()
    loss_sdpa, grads_sdpa = loss_and_grads("sdpa")
    assert abs(loss_kernel.item() - loss_sdpa.item()) < 1e-2
    for g, r in zip(grads_kernel, grads_sdpa):
        assert rel_err(g, r) < 3e-2


def test_choose_window_kernel_resolves_only_for_models_with_windows():
    windowed = GPT(GPTConfig(sequence_len=64, vocab_size=32, n_layer=4, n_head=2, n_kv_head=2, n_embd=16,
                             window_pattern="SL"))
    assert windowed.choose_window_kernel("auto") == "attention kernel of the 2 sliding-window layers: sdpa"
    with pytest.raises(UsageError, match="--attention cudnn needs a CUDA GPU"):
        windowed.choose_window_kernel("cudnn")
    full = GPT(GPTConfig(sequence_len=64, vocab_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=16))
    assert full.choose_window_kernel("cudnn") is None


@cudnn_frontend
def test_cudnn_windows_under_dynamic_shapes_match_sdpa_at_several_lengths_on_cuda():
    """mid_train and chat_sft compile with dynamic shapes (padded rows of varying width)."""
    config = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, n_embd=256,
                       window_pattern="SL", short_window=100)
    model = random_gpt(config).cuda().train()

    def losses_and_grads(kernel: str):
        assert model.choose_window_kernel(kernel) == f"attention kernel of the 1 sliding-window layers: {kernel}"
        compiled = torch.compile(model, dynamic=True)
        results = []
        for rows, length in [(3, 300), (2, 517), (4, 1024)]:
            generator = torch.Generator(device="cuda").manual_seed(length)
            idx = torch.randint(0, 512, (rows, length), device="cuda", generator=generator)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(idx, idx.roll(-1, dims=1))
            results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
        torch._dynamo.reset()
        return results

    for (loss, grads), (loss_ref, grads_ref) in zip(losses_and_grads("cudnn"), losses_and_grads("sdpa")):
        assert abs(loss.item() - loss_ref.item()) < 1e-2
        for g, r in zip(grads, grads_ref):
            assert rel_err(g, r) < 3e-2
