"""StaticDecoder: its fixed-shape step equals full recomputation and the KV-cache path; Engine's static paths
decode the same tokens as the dynamic one (forced tokens included); CUDA graph replay (CUDA only); the
decode benchmark's CPU path."""

import json

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.static_decode import StaticDecoder, cache_length_bucket
from nanochat.tokenizer import train_tokenizer
from scripts import bench_decode
from tests.fixtures.models import random_gpt

VOCAB = 300
TEXT = "The quick brown fox {i} jumps over the lazy dog; 2+2=4. Café {i}!"
TIGHT = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT.format(i=i) for i in range(100)], VOCAB)


def random_model(seed: int = 0, **overrides) -> GPT:
    """A tiny float32 GPT with every matrix random (init_weights zeroes the output projections)."""
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=4, n_embd=32)
    fields.update(overrides)
    return random_gpt(GPTConfig(**fields), seed, random_resid_lambdas=True)


def prefilled(model: GPT, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
    config = model.config
    cache = KVCache(1, config.n_kv_head, config.head_dim, len(prompt), config.n_layer)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), kv_cache=cache)[:, -1]
    return cache, logits


SHAPES = {
    "L": dict(window_pattern="L"),
    "SL-window-3": dict(window_pattern="SL", short_window=3),
    "SSL-gqa": dict(window_pattern="SSL", short_window=5, n_head=4, n_kv_head=2),
    "L-gqa-4-to-1": dict(n_head=4, n_kv_head=1),
}


@pytest.mark.parametrize("shape,batch", [("L", 1), ("SL-window-3", 3), ("SSL-gqa", 1), ("SSL-gqa", 3),
                                         ("L-gqa-4-to-1", 2)])
def test_static_step_equals_recomputation_and_kv_cache(shape, batch):
    model = random_model(**SHAPES[shape])
    config = model.config
    prompt = [1, 5, 7, 9, 11, 2]
    steps = 30  # with the 6-token prompt, runs past sequence_len (32) and far past the windows
    generator = torch.Generator().manual_seed(1)
    fed = torch.randint(0, VOCAB, (batch, steps), generator=generator)  # a different stream per row
    prompt_cache, _ = prefilled(model, prompt)
    decoder = StaticDecoder(model, batch, max_len=64)
    assert decoder.load_prefix(prompt_cache) == len(prompt)
    kv_cache = KVCache(batch, config.n_kv_head, config.head_dim, len(prompt) + steps, config.n_layer)
    kv_cache.prefill_from(prompt_cache)
    with torch.no_grad():
        for t in range(steps):
            static = decoder.step(fed[:, t], len(prompt) + t).clone()
            cached = model(fed[:, t:t + 1], kv_cache=kv_cache)[:, -1]
            torch.testing.assert_close(static, cached, **TIGHT)
        full = model(torch.cat([torch.tensor([prompt] * batch), fed], dim=1))[:, -1]
    torch.testing.assert_close(static, full, **TIGHT)


@pytest.mark.parametrize("shape", ["SL-window-3", "SSL-gqa"])
def test_static_step_with_per_row_positions_equals_each_prompt_alone(shape):
    """Prompts of 2, 7 and 4 tokens in rows (0, 1), (2,) and (3,), fed different tokens per row: each row's
    logits equal its sequence run alone, and the ragged KVCache path of GPT.forward."""
    model = random_model(**SHAPES[shape])
    config = model.config
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (2, 7, 4)]
    row_prompts = [0, 0, 1, 2]
    steps = 20  # far past the windows
    fed = torch.randint(0, VOCAB, (4, steps), generator=generator)
    caches = [prefilled(model, prompt)[0] for prompt in prompts]
    decoder = StaticDecoder(model, 4, max_len=32)
    for rows, cache in zip((slice(0, 2), slice(2, 3), slice(3, 4)), caches):
        decoder.load_prefix(cache, rows)
    kv_cache = KVCache(4, config.n_kv_head, config.head_dim, 7 + steps, config.n_layer)
    kv_cache.prefill_rows([caches[p] for p in row_prompts], 1)
    starts = torch.tensor([len(prompts[p]) for p in row_prompts])
    with torch.no_grad():
        for t in range(steps):
            static = decoder.step(fed[:, t], starts + t).clone()
            torch.testing.assert_close(static, model(fed[:, t:t + 1], kv_cache=kv_cache)[:, -1], **TIGHT)
        for row, p in enumerate(row_prompts):
            alone = model(torch.cat([torch.tensor(prompts[p]), fed[row]])[None])[0, -1]
            torch.testing.assert_close(static[row], alone, **TIGHT)


def test_compiled_step_pieces_equal_the_eager_step_without_per_layer_recompiles():
    model = random_model(**SHAPES["SSL-gqa"])
    prompt = [1, 5, 7, 9, 11, 2]
    cache, _ = prefilled(model, prompt)
    eager = StaticDecoder(model, 2, max_len=64)
    compiled = StaticDecoder(model, 2, max_len=64, compile_step=True)
    eager.load_prefix(cache)
    compiled.load_prefix(cache)
    torch._dynamo.utils.counters.clear()
    for t in range(12):
        expected = eager.step([3, 4], len(prompt) + t).clone()
        torch.testing.assert_close(compiled.step([3, 4], len(prompt) + t), expected, atol=1e-4, rtol=1e-4)
    # one graph per piece, plus one for the first layer, whose inputs x and x0 are the same tensor
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 7
    torch.testing.assert_close(compiled.kv, eager.kv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", ["SL-window-3", "SSL-gqa"])
def test_static_greedy_tokens_equal_recomputation(shape):
    model = random_model(seed=2, **SHAPES[shape])
    prompt = [3, 8, 13, 21]
    cache, logits = prefilled(model, prompt)
    decoder = StaticDecoder(model, 2, max_len=cache_length_bucket(len(prompt) + 40))
    decoder.load_prefix(cache)
    ids = list(prompt)
    token = logits.argmax(-1).repeat(2)
    for _ in range(40):
        ids.append(int(token[0]))
        token = decoder.step(token, len(ids) - 1).argmax(-1)
        assert int(token[0]) == int(token[1])
    with torch.no_grad():
        for t in range(len(prompt), len(ids)):
            assert int(model(torch.tensor([ids[:t]]))[0, -1].argmax()) == ids[t]


def test_positions_outside_the_cache_are_refused():
    model = random_model()
    decoder = StaticDecoder(model, 1, max_len=8)
    with pytest.raises(ValueError, match="outside this decoder's cache of 8 positions"):
        decoder.step([1], 8)
    with pytest.raises(ValueError, match="outside"):
        decoder.step([1], -1)
    with pytest.raises(ValueError, match="one token per row"):
        decoder.step([1, 2], 3)
    with pytest.raises(ValueError, match=r"per-row positions must be a long tensor of shape \(1,\)"):
        decoder.step([1], torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"batch 1 or 1 \(the rows it fills\), got batch 2"):
        decoder.load_prefix(KVCache(2, 4, 8, 4, 3))
    long_cache = KVCache(1, 4, 8, 9, 3)
    long_cache.pos = 9
    with pytest.raises(ValueError, match="more than this decoder's 8"):
        decoder.load_prefix(long_cache)
    assert cache_length_bucket(1) == cache_length_bucket(256) == 256 and cache_length_bucket(257) == 512


def test_in_place_weight_updates_are_seen_and_replaced_parameters_make_the_decoder_stale():
    model = random_model()
    prompt = [1, 5, 7]
    cache, _ = prefilled(model, prompt)
    decoder = StaticDecoder(model, 1, max_len=8)
    decoder.load_prefix(cache)
    before = decoder.step([4], len(prompt)).clone()
    with torch.no_grad():  # in place, as an optimizer step does: the fused q/k/v copy must follow
        model.transformer.h[1].attn.c_k.weight.mul_(-1.5)
        model.lm_head.weight.mul_(2.0)
        expected = model(torch.tensor([prompt + [4]]))[:, -1]
    decoder.load_prefix(prefilled(model, prompt)[0])
    after = decoder.step([4], len(prompt))
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, **TIGHT)
    assert not decoder.is_stale()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert decoder.is_stale()


def test_the_decoder_follows_a_real_optimizer_step():
    """Muon and AdamW update in place with foreach/fused ops; the decoder built before the step must see them
    (RL rollouts decode with a decoder that outlives many optimizer steps)."""
    model = random_model()
    optimizer = model.setup_optimizer(unembedding_lr=0.05, embedding_lr=0.5, matrix_lr=0.2, scalar_lr=0.5)
    prompt = [1, 5, 7]
    decoder = StaticDecoder(model, 1, max_len=8)
    decoder.load_prefix(prefilled(model, prompt)[0])
    before = decoder.step([4], len(prompt)).clone()
    loss = model(torch.tensor([prompt + [4]]), targets=torch.tensor([[5, 7, 4, 2]]))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(torch.tensor([prompt + [4]]))[:, -1]
    decoder.load_prefix(prefilled(model, prompt)[0])
    after = decoder.step([4], len(prompt))
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, expected, **TIGHT)


class ForcingEngine(Engine):
    """Forces a fixed token run into every row after its third token, as the calculator tool would."""

    FORCED = [7, 8, 9]

    def _track_tool_use(self, row, token):
        row.seen = getattr(row, "seen", 0) + 1
        if row.seen == 3:
            row.forced.extend(self.FORCED)


@pytest.mark.parametrize("temperature,top_k,num_samples", [(0.0, None, 1), (1.0, 20, 3)])
def test_engine_static_path_equals_dynamic_path(tokenizer, temperature, top_k, num_samples):
    model = random_model(seed=4, **SHAPES["SSL-gqa"])
    prompt = tokenizer.encode("The lazy fox", prepend="<|bos|>")
    runs = {}
    for decode in ("dynamic", "static"):
        engine = ForcingEngine(model, tokenizer, decode=decode)
        runs[decode] = list(engine.generate(prompt, num_samples, max_tokens=40, temperature=temperature,
                                            top_k=top_k, seed=5))
        assert engine.last_decode_path == decode
    assert runs["static"] == runs["dynamic"]
    masks = [mask for _, mask in runs["static"]]
    assert masks[3:6] == [[0] * num_samples] * 3 and masks[2] == [1] * num_samples
    assert [tokens for tokens, _ in runs["static"][3:6]] == [[t] * num_samples for t in ForcingEngine.FORCED]


def test_engine_reuses_its_decoder_and_decodes_overlapping_calls_dynamically(tokenizer):
    engine = Engine(random_model(), tokenizer, decode="static")
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    first = engine.generate(prompt, max_tokens=5, temperature=0.0)
    next(first)
    decoder = engine._decoder
    overlapping = list(engine.generate(prompt, max_tokens=5, temperature=0.0))
    assert engine.last_decode_path == "dynamic"
    assert [next(first) for _ in range(4)] == overlapping[1:]
    assert list(first) == []
    list(engine.generate(prompt, max_tokens=9, temperature=0.0))
    assert engine._decoder is decoder and engine.last_decode_path == "static"


def test_warm_up_builds_the_decoder_the_first_answer_then_reuses(tokenizer):
    engine = Engine(random_model(), tokenizer, decode="static")
    assert engine.warm_up(2) >= 0
    decoder = engine._decoder
    assert (decoder.batch_size, decoder.max_len) == (2, 256)
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    list(engine.generate(prompt, 2, max_tokens=20, temperature=0.0))
    assert engine._decoder is decoder and engine.last_decode_path == "static"


def test_requested_graph_path_falls_back_loudly_once_on_cpu(tokenizer, capsys):
    model = random_model()
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    dynamic = list(Engine(model, tokenizer).generate(prompt, max_tokens=6, temperature=0.0))
    engine = Engine(model, tokenizer, decode="graph")
    assert list(engine.generate(prompt, max_tokens=6, temperature=0.0)) == dynamic
    assert list(engine.generate(prompt, max_tokens=6, temperature=0.0)) == dynamic
    assert engine.last_decode_path == "dynamic"
    err = capsys.readouterr().err
    assert err.count("decode='graph' is unavailable") == 1 and "CUDA graphs need a CUDA model" in err
    auto = Engine(model, tokenizer, decode="auto")
    assert list(auto.generate(prompt, max_tokens=6, temperature=0.0)) == dynamic
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="decode must be one of"):
        Engine(model, tokenizer, decode="fast")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_replay_equals_the_eager_static_step():
    model = random_model(**SHAPES["SSL-gqa"]).cuda()
    prompt = [1, 5, 7, 9, 11, 2]
    cache = KVCache(1, 2, 8, len(prompt), 3, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.tensor([prompt], device="cuda"), kv_cache=cache)
    eager = StaticDecoder(model, 2, 64, dtype=torch.bfloat16)
    graph = StaticDecoder(model, 2, 64, dtype=torch.bfloat16)
    graph.capture()
    assert graph.captured and not eager.captured
    eager.load_prefix(cache)
    graph.load_prefix(cache)
    fed = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    for t in range(40):
        expected = eager.step(fed[:, t], len(prompt) + t)
        assert torch.equal(graph.step(fed[:, t], len(prompt) + t), expected)


@needs_cuda
@pytest.mark.parametrize("decode", ["graph", "compiled-graph"])
@pytest.mark.parametrize("weights", ["init", "random"])
def test_cuda_graph_engine_tokens_equal_the_dynamic_engine(tokenizer, weights, decode):
    """With init weights (zero output projections, as the benchmark uses) the tokens must be identical.

    With every matrix random, the masked attention over the whole cache rounds differently in bf16 from
    the dynamic path's, so the check is on teacher-forced logits: close, and the same argmax wherever the
    dynamic path's top two logits are further apart than that rounding.
    """
    model = random_model(**SHAPES["SSL-gqa"]).cuda()
    if weights == "init":
        model.init_weights()
    for param in model.parameters():
        if param.dim() == 2:
            param.data = param.data.to(torch.bfloat16)
    prompt = tokenizer.encode("The lazy fox", prepend="<|bos|>")
    dynamic = Engine(model, tokenizer)
    graph = Engine(model, tokenizer, decode=decode)
    expected = list(dynamic.generate(prompt, 3, max_tokens=40, temperature=0.0))
    got = list(graph.generate(prompt, 3, max_tokens=40, temperature=0.0))
    assert graph.last_decode_path == decode
    if weights == "init":
        assert got == expected
        return
    row = [tokens[0] for tokens, _ in expected]
    ids = prompt + row
    cache = KVCache(1, 2, 8, len(prompt), 3, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.tensor([prompt], device="cuda"), kv_cache=cache)
        decoder = StaticDecoder(model, 1, 64, dtype=torch.bfloat16, compile_step=decode == "compiled-graph")
        decoder.capture()
        decoder.load_prefix(cache)
        for t in range(len(prompt), len(ids) - 1):
            reference = model(torch.tensor([ids[:t + 1]], device="cuda"))[0, -1]
            static = decoder.step([ids[t]], t)[0]
            torch.testing.assert_close(static, reference, atol=0.1, rtol=0.0)
            top2 = reference.topk(2).values
            if top2[0] - top2[1] > 0.2:
                assert int(static.argmax()) == int(reference.argmax())



@needs_cuda
@pytest.mark.parametrize("decode", ["graph", "compiled-graph"])
def test_cuda_graph_decodes_prompts_of_different_lengths_as_each_alone(tokenizer, decode):
    """Rows at different positions under a captured graph (init weights: bf16 rounding cannot flip a token)
    write exactly what the dynamic path writes for each prompt on its own."""
    model = random_model(**SHAPES["SSL-gqa"]).cuda()
    model.init_weights()
    for param in model.parameters():
        if param.dim() == 2:
            param.data = param.data.to(torch.bfloat16)
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in ("The lazy fox", "A", "Over the lazy dog, twice")]
    assert len({len(p) for p in prompts}) == 3
    dynamic = Engine(model, tokenizer)
    expected = [dynamic.generate_batch(p, num_samples=2, max_tokens=24, temperature=0.0) for p in prompts]
    graph = Engine(model, tokenizer, decode=decode)
    assert graph.generate_batches(prompts, num_samples=2, max_tokens=24, temperature=0.0) == expected
    assert graph.last_decode_path == decode



@needs_cuda
def test_more_compiled_decoder_shapes_than_dynamos_default_limit_all_compile():
    """Batched evaluation meets a dozen (rows, cache length) shapes in one process; each must compile (past
    dynamo's default of 8 a fullgraph compile fails and the engine would fall back to the uncompiled graph)."""
    model = random_model(**SHAPES["SSL-gqa"]).cuda()
    model.init_weights()
    for rows in range(1, 11):
        decoder = StaticDecoder(model, rows, 64, dtype=torch.bfloat16, compile_step=True)
        decoder.capture()
        logits = decoder.step(torch.zeros(rows, dtype=torch.long, device="cuda"), 0)
        assert logits.shape == (rows, VOCAB) and torch.isfinite(logits).all()


def test_bench_decode_cpu_path(capsys):
    code = bench_decode.cli(["--depth", "2", "--aspect-ratio", "16", "--head-dim", "8", "--vocab-size", "128",
                             "--max-seq-len", "32", "--batch-sizes", "1,2", "--prompt-tokens", "6",
                             "--new-tokens", "5", "--mode", "eager,static,graph", "--weights", "random",
                             "--device-type", "cpu", "--teacher-forced"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [(r["batch_size"], r["mode"]) for r in lines] == [(b, m) for b in (1, 2)
                                                             for m in ("eager", "static", "graph")]
    for result in lines:
        assert result["dtype"] == "fp32"  # --dtype auto on a CPU
        assert result["tokens_match"] is True and result["first_mismatch_step"] is None
        assert result["new_tokens"] == 5 and result["decode_tok_per_s_total"] > 0
        assert result["ttft_ms"] > 0
        if result["batch_size"] == 1 and result["mode"] == "static":  # graph fell back on CPU: not compared
            forced = result["teacher_forced"]
            assert forced["steps"] == forced["argmax_agree"] == 4 and forced["max_abs_logit_diff"] <= 1e-4
            assert forced["widest_top2_gap_where_argmax_differs"] == 0.0
        else:
            assert "teacher_forced" not in result
        expected_path = {"eager": "dynamic", "static": "static", "graph": "dynamic"}[result["mode"]]
        assert result["decode_path"] == expected_path
    assert "decode='graph' is unavailable" in captured.err
    assert bench_decode.cli(["--mode", "eager,warp"]) == 2
    assert bench_decode.cli(["--out", "/"]) == 2
    assert "--out / is a folder" in capsys.readouterr().err
    assert bench_decode.cli(["--dtype", "bf16", "--device-type", "cpu"]) == 2
    assert "--dtype bf16 decodes under CUDA's autocast; on cpu use --dtype fp32" in capsys.readouterr().err


def test_bench_decode_times_several_prompts_one_at_a_time_and_together(capsys):
    code = bench_decode.cli(["--depth", "2", "--aspect-ratio", "16", "--head-dim", "8", "--vocab-size", "128",
                             "--max-seq-len", "32", "--batch-sizes", "2", "--prompt-tokens", "9", "--prompts", "3",
                             "--new-tokens", "5", "--mode", "eager,static", "--weights", "random",
                             "--device-type", "cpu"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["mode"], r["decode_path"], r["prompts"], r["batch_size"]) for r in lines] == [
        ("eager", "dynamic", 3, 2), ("static", "static", 3, 2)]
    for result in lines:
        assert result["tokens_match"] is True and result["one_at_a_time_s"] > 0 and result["together_s"] > 0
        assert len(result["prompt_tokens"]) == 3 and all(4 <= n <= 9 for n in result["prompt_tokens"])


@needs_cuda
def test_auto_decode_compiles_and_falls_back_to_the_uncompiled_graph_when_compiling_fails(tokenizer, monkeypatch,
                                                                                      capsys):
    model = random_model(**SHAPES["SSL-gqa"]).cuda()
    prompt = tokenizer.encode("The lazy fox", prepend="<|bos|>")
    engine = Engine(model, tokenizer, decode="auto")
    compiled = list(engine.generate(prompt, 2, max_tokens=12, temperature=0.0))
    assert engine.last_decode_path == "compiled-graph" and engine._decoder.compiled
    assert "compiling the decode step for 2 sample(s) and 256 positions" in capsys.readouterr().err

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    fresh = Engine(model, tokenizer, decode="auto")
    fallback = list(fresh.generate(prompt, 2, max_tokens=12, temperature=0.0))
    assert fresh.last_decode_path == "graph" and len(fallback) == len(compiled)
    assert "compiling the decode step failed (RuntimeError: no compiler here)" in capsys.readouterr().err
    list(fresh.generate(prompt, 2, max_tokens=12, temperature=0.0))
    assert fresh.last_decode_path == "graph" and capsys.readouterr().err == ""
