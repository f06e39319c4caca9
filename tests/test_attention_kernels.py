"""FlexAttention sliding-window path vs the SDPA reference: mask semantics and forward outputs on CPU,
outputs and gradients (eager and under torch.compile) on CUDA."""

import pytest
import torch

from nanochat.attention_kernels import (
    flex_sliding_window_attention,
    sliding_window_block_mask,
    sliding_window_mask_mod,
)
from nanochat.gpt import GPT, GPTConfig, attention, attention_mask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    got = attention(q, k, v, window, block_mask=sliding_window_block_mask(T, window, "cpu"))
    assert rel_err(got, reference) < 1e-5


def test_block_mask_of_another_length_falls_back_to_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    wrong_length = sliding_window_block_mask(256, 8, "cpu")
    assert torch.equal(attention(q, k, v, 8, block_mask=wrong_length), attention(q, k, v, 8))


def test_enable_flex_attention_only_on_short_window_layers_and_model_output_unchanged():
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
        assert model.enable_flex_attention() == 2
        assert [b.attn.block_mask is not None for b in model.transformer.h] == [True, False, True, False]
        got = model(idx)
        assert rel_err(got, reference) < 1e-5
        assert model.enable_flex_attention(False) == 0
        assert all(b.attn.block_mask is None for b in model.transformer.h)


@cuda
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flex_outputs_and_gradients_match_sdpa_on_cuda(kv_heads):
    torch.manual_seed(0)
    T, window, D = 2048, 512, 128
    shapes = [(2, 8, T, D), (2, kv_heads, T, D), (2, kv_heads, T, D)]
    inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    mask = sliding_window_block_mask(T, window, "cuda")
    out = flex_sliding_window_attention(*inputs, mask)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    upcast = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = attention(*upcast, window)
    ref_grads = torch.autograd.grad(ref, upcast, grad.double())
    assert rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-2


@cuda
def test_compiled_gpt_with_flex_matches_sdpa_loss_and_gradients_on_cuda():
    config = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                       window_pattern="SSSL")
    torch.manual_seed(0)
    model = GPT(config).cuda()
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name:
                param.normal_(0, param.size(1) ** -0.5)
    idx = torch.randint(0, 512, (4, 1024), device="cuda")
    targets = torch.randint(0, 512, (4, 1024), device="cuda")

    def loss_and_grads(flex: bool):
        model.enable_flex_attention(flex)
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(idx, targets)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    loss_flex, grads_flex = loss_and_grads(True)
    torch._dynamo.reset()
    loss_sdpa, grads_sdpa = loss_and_grads(False)
    assert abs(loss_flex.item() - loss_sdpa.item()) < 1e-2
    for g, r in zip(grads_flex, grads_sdpa):
        assert rel_err(g, r) < 3e-2
