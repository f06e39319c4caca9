"""Engine: cached decoding equals full recomputation, seeded sampling, stop tokens, context limit, tool use."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanochat.engine import Engine, TextStream, batch_decode_path
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import train_tokenizer
from tests.fixtures.models import random_gpt

VOCAB = 300
TEXT = "The quick brown fox {i} jumps over the lazy dog; 2+2=4 and 12*3=36. Café naïve 日本語 {i}!"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT.format(i=i) for i in range(200)], VOCAB)


def random_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT whose every matrix is random (init_weights zeroes the output projections)."""
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    fields.update(overrides)
    return random_gpt(GPTConfig(**fields), seed)


class ScriptedModel(nn.Module):
    """A stand-in model whose logits make greedy decoding write `script`, one token per answer position,
    whatever tokens it is fed (so forced tokens do not shift the script)."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = VOCAB, sequence_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(n_layer=1, n_kv_head=1, head_dim=2, sequence_len=sequence_len)
        self.script, self.prompt_len, self.vocab_size = script, prompt_len, vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, idx, kv_cache):
        self.calls += 1
        batch, tokens = idx.shape
        start = kv_cache.pos
        kv_cache.insert(0, torch.zeros(batch, 1, tokens, 2), torch.zeros(batch, 1, tokens, 2))
        logits = torch.zeros(batch, tokens, self.vocab_size)
        for t in range(tokens):
            answer_index = start + t - self.prompt_len + 1
            if 0 <= answer_index < len(self.script):
                logits[:, t, self.script[answer_index]] = 10.0
        return logits


def greedy_by_recomputation(model: GPT, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("window_pattern,num_samples", [("L", 1), ("SL", 1), ("SSL", 3)])
def test_greedy_with_cache_equals_full_recomputation(tokenizer, window_pattern, num_samples):
    model = random_model(n_layer=3, window_pattern=window_pattern, short_window=3)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "the lazy fox"}]})
    steps = 40  # runs past sequence_len (32) and far past the 3-token window
    expected = greedy_by_recomputation(model, prompt, steps)
    columns = list(engine.generate(prompt, num_samples=num_samples, max_tokens=steps, temperature=0.0))
    assert len(columns) == steps
    for tokens, masks in columns:
        assert len(tokens) == len(masks) == num_samples
        assert masks == [1] * num_samples
    for row in range(num_samples):
        assert [tokens[row] for tokens, _ in columns] == expected


def test_inference_mode_does_not_leak_into_the_caller(tokenizer):
    engine = Engine(random_model(), tokenizer)
    steps = engine.generate(tokenizer.encode("The quick", prepend="<|bos|>"), max_tokens=3)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert len(list(steps)) == 2


def test_top_k_one_is_greedy(tokenizer):
    engine = Engine(random_model(), tokenizer)
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    greedy = [t for t, _ in engine.generate(prompt, max_tokens=12, temperature=0.0)]
    top1 = [t for t, _ in engine.generate(prompt, max_tokens=12, temperature=1.5, top_k=1, seed=3)]
    assert top1 == greedy


def test_seeded_sampling_is_reproducible_and_rows_differ(tokenizer):
    engine = Engine(random_model(), tokenizer)
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    first = list(engine.generate(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=7))
    again = list(engine.generate(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=7))
    other = list(engine.generate(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=8))
    assert first == again
    assert first != other
    rows = {tuple(tokens[i] for tokens, _ in first) for i in range(4)}
    assert len(rows) == 4


def test_generate_batch_stops_each_sample_at_its_stop_token(tokenizer):
    end, bos = tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id
    words = tokenizer.encode(" fox jumps")
    prompt = [bos, 5, 6]
    script = words + [end] + words + words
    engine = Engine(ScriptedModel(script, len(prompt)), tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert results == [words, words]
    assert masks == [[1] * len(words)] * 2
    assert engine.model.calls == len(words) + 1  # prefill + one forward per fed token, none after the stop

    engine = Engine(ScriptedModel(words + [bos] + words, len(prompt)), tokenizer)
    results, _ = engine.generate_batch(prompt, max_tokens=50, temperature=0.0)
    assert results == [words]


def test_max_tokens_and_the_context_limit(tokenizer):
    model = random_model(sequence_len=8)  # rotary tables cover 80 positions
    engine = Engine(model, tokenizer)
    assert engine.max_context == model.rotary_len == 80
    assert len(list(engine.generate([tokenizer.bos_id] * 10, max_tokens=7, temperature=0.0))) == 7
    assert len(list(engine.generate([tokenizer.bos_id] * 75, max_tokens=100, temperature=0.0))) == 5
    assert list(engine.generate([tokenizer.bos_id] * 80, max_tokens=100)) == []
    with pytest.raises(ValueError, match="at most 80"):
        list(engine.generate([tokenizer.bos_id] * 81, max_tokens=1))


def test_tool_call_forces_the_calculator_output_with_mask_zero(tokenizer):
    sid = tokenizer.special_id
    filler = tokenizer.encode("9")  # what the model would write where the tool's tokens go
    forced = [sid("<|output_start|>"), *tokenizer.encode("4"), sid("<|output_end|>")]
    call = [sid("<|python_start|>"), *tokenizer.encode("2+2"), sid("<|python_end|>")]
    tail = tokenizer.encode(" fox")
    prompt = [tokenizer.bos_id, sid("<|user_start|>"), sid("<|user_end|>"), sid("<|assistant_start|>")]
    script = call + filler * len(forced) + tail + [sid("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, len(prompt)), tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    for result, mask in zip(results, masks):
        assert result == call + forced + tail
        assert mask == [1] * len(call) + [0] * len(forced) + [1] * len(tail)
    assert tokenizer.decode(forced) == "<|output_start|>4<|output_end|>"


def test_refused_tool_call_forces_nothing(tokenizer):
    sid = tokenizer.special_id
    call = [sid("<|python_start|>"), *tokenizer.encode("fox.jumps"), sid("<|python_end|>")]
    tail = tokenizer.encode(" dog")
    prompt = [tokenizer.bos_id, sid("<|assistant_start|>")]
    engine = Engine(ScriptedModel(call + tail + [sid("<|assistant_end|>")], len(prompt)), tokenizer)
    results, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert results == [call + tail]
    assert masks == [[1] * len(call + tail)]


class ChainEngine(Engine):
    """Adds a large logit to `chain[token]` after each fed token in `chain` (in the prompt pass, the dynamic
    steps and the static decoder's steps alike), so greedy rows write scripted runs wherever a chain token
    leads: a calculator call, an early `<|assistant_end|>`. Elsewhere the random model decides."""

    def __init__(self, model, tokenizer, chain: dict[int, int], decode: str):
        super().__init__(model, tokenizer, decode=decode)
        self.bias = torch.zeros(VOCAB, VOCAB)
        for token, successor in chain.items():
            self.bias[token, successor] = 100.0

    def _forward(self, ids, cache):
        return super()._forward(ids, cache) + self.bias[ids[:, -1]]

    def _build_decoder(self, path, batch_size, max_len):
        decoder = super()._build_decoder(path, batch_size, max_len)
        step = decoder.step
        decoder.step = lambda ids, position: step(ids, position) + self.bias[ids]
        return decoder


def scripted_prompts(tokenizer) -> tuple[list[list[int]], dict[int, int]]:
    """Prompts of 4, 10 and 6 tokens: the first makes its rows call the calculator (3+4), the second makes
    them stop after two tokens, the third leaves them to the model; and the chain that does it."""
    sid = tokenizer.special_id
    tool_trigger, stop_trigger = 200, 201
    expression = tokenizer.encode("3+4")
    call = [sid("<|python_start|>"), *expression, sid("<|python_end|>")]
    chain = {tool_trigger: call[0], **dict(zip(call, call[1:])), stop_trigger: 60, 60: 61, 61: sid("<|assistant_end|>")}
    bos = tokenizer.bos_id
    prompts = [[bos, 40, 41, tool_trigger], [bos, *range(80, 88), stop_trigger], [bos, 90, 91, 92, 93, 94]]
    return prompts, chain


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("window_pattern", ["L", "SSL"])
def test_generate_batches_rows_equal_each_prompt_decoded_alone(tokenizer, decode, window_pattern):
    """Greedy: prompts of different lengths in one batch write exactly what each writes alone, through the
    3-token window, a calculator call (forced tokens, mask 0) and rows that stop early."""
    model = random_model(n_layer=3, window_pattern=window_pattern, short_window=3)
    prompts, chain = scripted_prompts(tokenizer)
    engine = ChainEngine(model, tokenizer, chain, decode)
    alone = [engine.generate_batch(prompt, 2, max_tokens=30, temperature=0.0) for prompt in prompts]
    together = engine.generate_batches(prompts, 2, max_tokens=30, temperature=0.0)
    assert engine.last_decode_path == decode
    assert together == alone
    (tool_answers, tool_masks), (stop_answers, _), (free_answers, _) = together
    forced = [tokenizer.special_id("<|output_start|>"), *tokenizer.encode("7"), tokenizer.special_id("<|output_end|>")]
    assert tool_answers[0][5:8] == forced and tool_masks[0][:10] == [1] * 5 + [0] * 3 + [1] * 2
    assert stop_answers == [[60, 61]] * 2
    assert len(free_answers[0]) == 30
    if decode == "static":
        dynamic = ChainEngine(model, tokenizer, chain, "dynamic")
        assert dynamic.generate_batches(prompts, 2, max_tokens=30, temperature=0.0) == together


def test_generate_batches_seeded_sampling_is_reproducible_on_both_paths(tokenizer):
    model = random_model(n_layer=3, window_pattern="SL", short_window=3)
    prompts, chain = scripted_prompts(tokenizer)
    runs = {}
    for decode in ("dynamic", "static"):
        engine = ChainEngine(model, tokenizer, chain, decode)
        runs[decode, 7] = engine.generate_batches(prompts, 3, max_tokens=20, temperature=1.0, top_k=50, seed=7)
        assert engine.generate_batches(prompts, 3, max_tokens=20, temperature=1.0, top_k=50, seed=7) == runs[decode, 7]
        runs[decode, 8] = engine.generate_batches(prompts, 3, max_tokens=20, temperature=1.0, top_k=50, seed=8)
    assert runs["static", 7] == runs["dynamic", 7] and runs["dynamic", 8] != runs["dynamic", 7]
    free_answers = runs["dynamic", 7][2][0]
    assert len({tuple(answer) for answer in free_answers}) == 3


def test_generate_batches_decodes_alone_what_cannot_share_a_batch(tokenizer):
    """A prompt the context limit cuts, and prompts of different lengths for a model that is not a GPT."""
    engine = Engine(random_model(sequence_len=8), tokenizer)  # 80 positions
    prompts = [[tokenizer.bos_id] * 75, [tokenizer.bos_id, 5, 6], [tokenizer.bos_id] * 7]
    together = engine.generate_batches(prompts, 2, max_tokens=10, temperature=0.0)
    assert [len(answers[0]) for answers, _ in together] == [5, 10, 10]
    assert together == [engine.generate_batch(prompt, 2, max_tokens=10, temperature=0.0) for prompt in prompts]
    assert engine.generate_batches(prompts, 2, max_tokens=0) == [([[], []], [[], []])] * 3

    words = tokenizer.encode(" fox jumps over")
    scripted = Engine(ScriptedModel(words, prompt_len=3), tokenizer)
    prompts = [[tokenizer.bos_id, 5, 6], [tokenizer.bos_id, 5, 6, 7]]
    results = scripted.generate_batches(prompts, max_tokens=20, temperature=0.0)
    assert results == [scripted.generate_batch(prompt, max_tokens=20, temperature=0.0) for prompt in prompts]
    assert results[0][0][0][:len(words)] == words and results[1][0][0][:len(words) - 1] == words[1:]


def test_text_stream_holds_back_split_utf8(tokenizer):
    text = "naïve 日本語 fox"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some character spans several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces


def test_evaluation_and_rollouts_decode_with_the_cuda_graph_on_cuda_only():
    assert batch_decode_path("cpu") == "dynamic"
    assert batch_decode_path(torch.device("mps")) == "dynamic"
    assert batch_decode_path("cuda") == "graph"
    assert batch_decode_path(torch.device("cuda", 3)) == "graph"
