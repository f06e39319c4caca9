"""GPT model and KV cache: shapes, masking, decoding with the cache, losses, FLOPs and parameter counts."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, attention, attention_mask
from nanochat.kv_cache import KVCache
from tests.fixtures.models import random_gpt

VOCAB = 37


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(sequence_len=24, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every weight is random, so attention and every block visibly matter.

    (init_weights zeroes the output projections, which would make most masking tests pass vacuously.)
    """
    return random_gpt(config, seed)


def make_cache(model: GPT, batch_size: int, max_len: int) -> KVCache:
    c = model.config
    return KVCache(batch_size, c.n_kv_head, c.head_dim, max_len, c.n_layer, device="cpu", dtype=torch.float32)


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny_config(n_kv_head=3)
    with pytest.raises(ValueError, match="even"):
        tiny_config(n_embd=12, n_head=4, n_kv_head=4)
    with pytest.raises(ValueError, match="window_pattern"):
        tiny_config(window_pattern="SXL")
    with pytest.raises(ValueError, match="positive"):
        tiny_config(n_layer=0)
    with pytest.raises(ValueError, match="short_window"):
        tiny_config(short_window=0)
    assert tiny_config().short_window == 24 // 4


def test_layer_windows_tile_pattern_and_force_last_layer_full():
    config = tiny_config(n_layer=5, window_pattern="SSL", short_window=3)
    assert config.layer_windows() == [3, 3, None, 3, None]
    assert tiny_config(n_layer=3, window_pattern="S", short_window=5).layer_windows() == [5, 5, None]


def test_forward_shapes_dtypes_and_init():
    config = tiny_config()
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    assert torch.all(model.resid_lambdas == 1) and torch.all(model.x0_lambdas == 0)
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
    idx = torch.randint(0, VOCAB, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() < config.logit_softcap
    # near-uniform predictions at init: loss close to log(vocab)
    assert abs(model(idx, idx).item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.05


def test_init_is_deterministic_and_meta_construction_matches():
    config = tiny_config()
    direct = GPT(config)
    torch.manual_seed(123)
    direct.init_weights()
    with torch.device("meta"):
        meta = GPT(config)
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.init_weights()
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(direct.cos, meta.cos) and torch.equal(direct.sin, meta.sin)
    assert "cos" not in direct.state_dict()


def test_softcap_bounds_logits():
    model = random_model(tiny_config(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    logits = model(torch.randint(0, VOCAB, (2, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_causality(pattern):
    model = random_model(tiny_config(window_pattern=pattern, short_window=3))
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def test_attention_mask_sliding_window():
    mask = attention_mask(3, 6, window=2, device="cpu")
    # queries are positions 3, 4, 5; each sees itself and 2 previous positions
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(attention_mask(2, 2, None, "cpu"), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))


def test_attention_function_sliding_window_influence():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    out = attention(q, k, v, window=3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2], v2[:, :, 2] = torch.randn(2, 8), torch.randn(2, 8)
    out2 = attention(q, k2, v2, window=3)
    # position 2 is visible to queries 2..5 only
    assert torch.allclose(out[:, :, :2], out2[:, :, :2]) and torch.allclose(out[:, :, 6:], out2[:, :, 6:])
    assert not torch.allclose(out[:, :, 5], out2[:, :, 5])
    assert torch.allclose(attention(q, k, v, window=None), attention(q, k, v, window=9), atol=1e-6)


def test_sliding_window_layer_ignores_tokens_beyond_window():
    # the last layer is always full, so look at the output of layer 0 (an 'S' layer) with a hook
    window = 3
    model = random_model(tiny_config(window_pattern="SL", short_window=window))
    outputs = []
    model.transformer.h[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    idx = torch.randint(0, VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 4] = (changed[0, 4] + 1) % VOCAB
    with torch.no_grad():
        final_a, final_b = model(idx), model(changed)
    a, b = outputs
    # block 0's input mixes in x0 only at the same position, so token 4 reaches positions 4..4+window
    assert not torch.allclose(a[0, 4 + window], b[0, 4 + window], atol=1e-4)
    assert torch.allclose(a[0, 4 + window + 1:], b[0, 4 + window + 1:], atol=1e-6)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)
    # the full final layer still carries the change to the end
    assert not torch.allclose(final_a[0, -1], final_b[0, -1], atol=1e-4)


def test_gqa_runs_and_backprops():
    model = random_model(tiny_config(n_head=4, n_kv_head=2, window_pattern="SL", short_window=4))
    assert model.transformer.h[0].attn.c_k.weight.shape == (16, 32)
    model.train()
    idx = torch.randint(0, VOCAB, (2, 12))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_k.weight.grad is not None


def test_attention_gets_token_major_inputs_and_its_output_reshapes_without_a_copy(monkeypatch):
    """q, k, v reach attention as (B, H, T, D) views of token-major memory: an output laid out like q then
    reshapes back to (B, T, C) as a view, and its gradient comes back in that same layout."""
    import nanochat.gpt as gpt

    seen = []
    reference_attention = gpt.attention

    def recording_attention(q, k, v, window, kernel=None):
        seen.append([t.stride() for t in (q, k, v)])
        return reference_attention(q, k, v, window, kernel)

    model = random_model(tiny_config(n_kv_head=2))
    monkeypatch.setattr(gpt, "attention", recording_attention)
    idx = torch.randint(0, VOCAB, (2, 12))
    model(idx, idx)
    heads, kv_heads, dim = 4, 2, 8
    assert len(seen) == model.config.n_layer
    for q_stride, k_stride, v_stride in seen:
        assert q_stride[1:] == (dim, heads * dim, 1)
        assert k_stride[1:] == v_stride[1:] == (dim, kv_heads * dim, 1)


def greedy_with_cache(model: GPT, prompt: torch.Tensor, steps: int, prefill_chunks: int = 1):
    cache = make_cache(model, prompt.size(0), prompt.size(1) + steps)
    logits = None
    for chunk in prompt.chunk(prefill_chunks, dim=1):
        logits = model(chunk, kv_cache=cache)
    tokens, step_logits = prompt, []
    for _ in range(steps):
        step_logits.append(logits[:, -1])
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        logits = model(next_token, kv_cache=cache)
    assert cache.pos == tokens.size(1)
    return tokens, step_logits


def greedy_full_recompute(model: GPT, prompt: torch.Tensor, steps: int):
    tokens, step_logits = prompt, []
    for _ in range(steps):
        logits = model(tokens)[:, -1]
        step_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, step_logits


@pytest.mark.parametrize("pattern,n_kv_head,chunks", [("L", 4, 1), ("SSL", 2, 1), ("SL", 4, 3)])
def test_kv_cache_greedy_matches_full_recompute(pattern, n_kv_head, chunks):
    # 14 new tokens after a 9-token prompt: well past the short window of 4 and past sequence_len (24)
    model = random_model(tiny_config(n_layer=3, window_pattern=pattern, n_kv_head=n_kv_head, short_window=4))
    prompt = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        cached_tokens, cached_logits = greedy_with_cache(model, prompt, 20, prefill_chunks=chunks)
        full_tokens, full_logits = greedy_full_recompute(model, prompt, 20)
    assert torch.equal(cached_tokens, full_tokens)
    for a, b in zip(cached_logits, full_logits):
        assert torch.allclose(a, b, atol=1e-4)


def test_kv_cache_prefill_from_batch_one_into_batch_n():
    model = random_model(tiny_config(n_layer=3, window_pattern="SL", n_kv_head=2, short_window=4))
    prompt = torch.randint(0, VOCAB, (1, 7))
    first_tokens = torch.tensor([[3], [11], [29]])
    with torch.no_grad():
        single = make_cache(model, 1, 7)
        model(prompt, kv_cache=single)
        batch = make_cache(model, 3, 20)
        batch.prefill_from(single)
        assert batch.pos == 7
        logits = model(first_tokens, kv_cache=batch)
        tokens = torch.cat([prompt.expand(3, -1), first_tokens], dim=1)
        for _ in range(8):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            logits = model(next_token, kv_cache=batch)
        for row in range(3):
            expected, _ = greedy_full_recompute(model, tokens[row:row + 1, :8], 8)
            assert torch.equal(tokens[row:row + 1], expected)


@pytest.mark.parametrize("pattern,n_kv_head", [("L", 4), ("SSL", 2)])
def test_kv_cache_rows_at_different_positions_match_each_prompt_alone(pattern, n_kv_head):
    """Prompts of 3, 9 and 6 tokens, two rows each, then fed tokens (a 2-token chunk, then single tokens)
    that differ per row: every row's logits equal its own sequence run alone, through the short window."""
    model = random_model(tiny_config(n_layer=3, window_pattern=pattern, n_kv_head=n_kv_head, short_window=4))
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=generator) for n in (3, 9, 6)]
    fed = torch.randint(0, VOCAB, (6, 12), generator=generator)
    with torch.no_grad():
        prefixes = []
        for prompt in prompts:
            prefixes.append(make_cache(model, 1, prompt.size(1)))
            model(prompt, kv_cache=prefixes[-1])
        batch = make_cache(model, 6, 9 + 12)
        batch.prefill_rows(prefixes, 2)
        assert batch.pos == 9 and batch.positions.tolist() == [3, 3, 9, 9, 6, 6]
        got = [model(fed[:, :2], kv_cache=batch)[:, -1]]
        got += [model(fed[:, t:t + 1], kv_cache=batch)[:, -1] for t in range(2, 12)]
        assert batch.pos == 21 and batch.positions.tolist() == [15, 15, 21, 21, 18, 18]
        for row in range(6):
            sequence = torch.cat([prompts[row // 2][0], fed[row]])
            start = len(prompts[row // 2][0])
            alone = model(sequence[None])[0]
            for t, logits in zip([1, *range(2, 12)], got):
                torch.testing.assert_close(logits[row], alone[start + t], atol=1e-4, rtol=1e-4)


def test_kv_cache_prefill_rows_of_equal_lengths_keeps_one_position():
    prefixes = [KVCache(1, 2, 4, 5, 2) for _ in range(3)]
    for prefix in prefixes:
        prefix.pos = 5
    cache = KVCache(6, 2, 4, 8, 2)
    cache.prefill_rows(prefixes, 2)
    assert cache.pos == 5 and cache.positions is None and cache.query_positions(1) is None
    with pytest.raises(ValueError, match="fills 6 rows"):
        cache.prefill_rows(prefixes, 1)
    prefixes[1].pos = 3
    cache.prefill_rows(prefixes, 2)
    assert cache.query_positions(2).tolist() == [[5, 6], [5, 6], [3, 4], [3, 4], [5, 6], [5, 6]]
    cache.reset()
    assert cache.pos == 0 and cache.positions is None


def test_kv_cache_errors_and_reset():
    cache = KVCache(1, 2, 4, max_len=5, num_layers=2)
    k = torch.zeros(1, 2, 4, 4)
    cache.insert(0, k, k)
    cache.insert(1, k, k)
    assert cache.pos == 4
    with pytest.raises(ValueError, match="overflow"):
        cache.insert(0, k, k)
    with pytest.raises(ValueError, match="batch"):
        KVCache(2, 2, 4, 8, 2).prefill_from(KVCache(3, 2, 4, 8, 2))
    cache.reset()
    assert cache.pos == 0


def test_loss_reductions_and_ignore_index():
    model = random_model(tiny_config())
    idx = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    targets[0, :3] = -1
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
        total = model(idx, targets, loss_reduction="sum")
        mean = model(idx, targets)
        logits = model(idx)
    assert per_token.shape == (2, 8)
    assert torch.all(per_token[0, :3] == 0)
    kept = targets != -1
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(per_token[kept], manual[kept], atol=1e-5)
    assert torch.allclose(total, per_token.sum(), atol=1e-4)
    assert torch.allclose(mean, per_token.sum() / kept.sum(), atol=1e-5)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="max")


def test_param_counts_and_flops_match_hand_formula():
    config = tiny_config(n_layer=3, n_head=4, n_kv_head=2, window_pattern="SSL", short_window=5)
    model = GPT(config)
    d, kv, layers, vocab, seq, heads, hd = 32, 16, 3, VOCAB, 24, 4, 8
    matrices = layers * (d * d + 2 * d * kv + d * d + 8 * d * d)
    counts = model.param_counts()
    assert counts == {"embedding": vocab * d, "lm_head": vocab * d, "matrices": matrices, "scalars": 2 * layers,
                      "total": 2 * vocab * d + matrices + 2 * layers}
    assert model.num_params() == counts["total"]
    attention = 12 * heads * hd * (6 + 6 + seq)  # two 'S' layers see 5 + 1 keys, the 'L' layer 24
    assert model.estimate_flops() == 6 * (matrices + vocab * d) + attention


def test_setup_optimizer_groups_and_lr_scaling():
    config = tiny_config(n_embd=192, n_head=4, n_kv_head=2)
    model = GPT(config)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                                weight_decay=0.1)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    scale = (192 / 768) ** -0.5
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(0.004 * scale)
    assert by_param[id(model.transformer.wte.weight)]["lr"] == pytest.approx(0.2 * scale)
    assert by_param[id(model.resid_lambdas)]["lr"] == 0.5
    for block in model.transformer.h:
        for p in block.parameters():
            group = by_param[id(p)]
            assert group["kind"] == "muon" and group["lr"] == 0.02 and group["weight_decay"] == 0.1
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_regional_compilation_matches_eager_and_finishes_gradients_in_backward_order():
    config = tiny_config(n_layer=3, window_pattern="SL", short_window=5)
    eager = random_model(config).train()
    compiled = random_model(config).train()
    compiled.compile_regions()
    ready = []
    for param in compiled.parameters():
        param.register_post_accumulate_grad_hook(ready.append)
    tokens = torch.randint(0, VOCAB, (2, 25), generator=torch.Generator().manual_seed(0))
    torch._dynamo.utils.counters.clear()
    for model in (eager, compiled):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    for (name, expected), got in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)
    # blocks share graphs: one per window kind (S, L) for the blocks, one for the head and loss
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    # each block's gradients are final when its own backward ends, in the order overlap_reductions relies on
    position = {id(param): index for index, param in enumerate(ready)}
    order = compiled.backward_order()
    blocks = [list(block.parameters()) for block in compiled.transformer.h]
    assert position[id(order[0])] < min(position[id(p)] for p in blocks[-1])
    for later, earlier in zip(blocks[::-1], blocks[::-1][1:]):
        assert max(position[id(p)] for p in later) < min(position[id(p)] for p in earlier)
    assert max(position[id(p)] for p in blocks[0]) < position[id(compiled.transformer.wte.weight)]
