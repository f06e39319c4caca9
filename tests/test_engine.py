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
