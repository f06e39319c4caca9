"""The chat front ends: the web server (real uvicorn on a free port, a tiny random model) and the CLI.

The tiny model is a random GPT whose output layer only favours ASCII tokens, so it never stops on its own
and its text is plain; answers are checked against the Engine's own greedy output.
"""

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from torch import nn

from nanochat import checkpoint as ckpt
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import train_tokenizer
from scripts import chat_cli, chat_web
from scripts.chat_web import ChatLimits, SamplingDefaults, create_app
from tests.fixtures.models import random_gpt

VOCAB = 300
TEXT = "The quick brown fox {i} jumps over the lazy dog; 2+2=4. Café naïve 日本語 {i}!"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT.format(i=i) for i in range(200)], VOCAB)


def chatty_model(tokenizer, seed: int = 0) -> GPT:
    """A random tiny GPT that writes printable ASCII and (practically) never a special token."""
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = random_gpt(config, seed)
    with torch.no_grad():
        ascii_rows = [i for i in range(VOCAB) if not tokenizer.is_special(i)
                      and all(32 <= b < 127 for b in tokenizer.token_to_bytes(i))]
        weight = torch.zeros_like(model.lm_head.weight)
        weight[ascii_rows] = torch.randn(len(ascii_rows), config.n_embd)
        model.lm_head.weight.copy_(weight)
    return model


class ScriptedModel(nn.Module):
    """Writes `script` token by token after the prompt (greedy), optionally pausing per forward pass."""

    def __init__(self, script, vocab_size=VOCAB, delay_s=0.0):
        super().__init__()
        self.config = SimpleNamespace(n_layer=1, n_kv_head=1, head_dim=2, sequence_len=4096)
        self.script, self.vocab_size, self.delay_s = script, vocab_size, delay_s
        self.anchor = nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def forward(self, idx, kv_cache):
        time.sleep(self.delay_s)
        batch, tokens = idx.shape
        start = kv_cache.pos
        if start == 0:
            self.prompt_len = tokens
        kv_cache.insert(0, torch.zeros(batch, 1, tokens, 2), torch.zeros(batch, 1, tokens, 2))
        logits = torch.zeros(batch, tokens, self.vocab_size)
        for t in range(tokens):
            k = start + t - self.prompt_len + 1
            if 0 <= k < len(self.script):
                logits[:, t, self.script[k]] = 10.0
        return logits


@contextlib.contextmanager
def serve(app):
    """Run the app under a real uvicorn server on 127.0.0.1 and a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def engines(tokenizer):
    model = chatty_model(tokenizer)
    return [Engine(model, tokenizer), Engine(model, tokenizer)]  # two replicas sharing one CPU model


@pytest.fixture(scope="module")
def server(engines):
    app = create_app(engines, defaults=SamplingDefaults(temperature=1.0, top_k=50, max_tokens=24), max_queue=200)
    with serve(app) as url:
        yield url


def parse_events(body: str) -> list[dict]:
    events = [json.loads(line[len("data: "):]) for line in body.split("\n") if line.startswith("data: ")]
    assert body.endswith("\n\n")
    return events


def stream_text(events: list[dict]) -> str:
    assert events[-1] == {"done": True}
    assert all("token" in e and isinstance(e["gpu"], int) for e in events[:-1]), events
    return "".join(e["token"] for e in events[:-1])


def user(text):
    return {"role": "user", "content": text}


def test_index_page_is_self_contained(server):
    response = httpx.get(server + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "/chat/completions" in html and 'id="new-chat"' in html and 'id="send"' in html
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html, re.IGNORECASE)
    assert not re.search(r"https?://", html)
    assert "@import" not in html


def test_health_and_stats(server):
    assert httpx.get(server + "/health").json() == {"status": "ok", "ready": True}
    stats = httpx.get(server + "/stats").json()
    assert stats["replicas"] == 2 and stats["max_queue"] == 200
    assert {"busy", "queue_depth", "requests_served", "requests_rejected"} <= set(stats)


def test_greedy_stream_matches_the_engine(server, engines, tokenizer):
    messages = [user("hello fox"), {"role": "assistant", "content": "hi"}, user("jump?")]
    response = httpx.post(server + "/chat/completions",
                          json={"messages": messages, "temperature": 0, "max_tokens": 20}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    text = stream_text(parse_events(response.text))
    prompt = tokenizer.render_for_completion({"messages": messages})
    expected, _ = engines[0].generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert len(expected[0]) == 20
    assert text == tokenizer.decode(expected[0])


def test_split_utf8_is_never_streamed_as_replacement_characters(tokenizer):
    answer = "naïve 日本語 café"
    script = tokenizer.encode(answer) + [tokenizer.special_id("<|assistant_end|>")]
    assert any("\ufffd" in tokenizer.decode([t]) for t in script)
    with serve(create_app([Engine(ScriptedModel(script), tokenizer)])) as url:
        body = httpx.post(url + "/chat/completions", json={"messages": [user("hi")], "temperature": 0}).text
    events = parse_events(body)
    assert stream_text(events) == answer
    assert not any("\ufffd" in e.get("token", "") for e in events)


BAD_REQUESTS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ({}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [user("x")] * 501}, "too many messages"),
    ({"messages": [user("x" * 8001)]}, "8000"),
    ({"messages": [user("x" * 7000), {"role": "assistant", "content": "y" * 7000}] * 2 + [user("z" * 7000)]},
     "32000"),
    ({"messages": [{"role": "system", "content": "be nice"}, user("hi")]}, "only 'user' and 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
    ({"messages": [user("a"), user("b")]}, "alternate"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, "last message"),
    ({"messages": [{"role": "user", "content": 5}]}, "string 'content'"),
    ({"messages": [user("half a pair \ud83d")]}, "lone surrogate"),  # valid JSON, not encodable text
    ({"messages": [user("hi")], "temperature": 2.5}, "temperature"),
    ({"messages": [user("hi")], "temperature": -0.1}, "temperature"),
    ({"messages": [user("hi")], "temperature": "hot"}, "temperature"),
    ({"messages": [user("hi")], "top_k": 0}, "top_k"),
    ({"messages": [user("hi")], "top_k": 201}, "top_k"),
    ({"messages": [user("hi")], "top_k": 2.5}, "top_k"),
    ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens"),
    ({"messages": [user("hi")], "max_tokens": 4097}, "max_tokens"),
    ({"messages": [user("hi " * 300)]}, "tokens"),  # longer than the tiny model's 640 positions
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_get_400_with_a_message(server, body, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server + "/chat/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_limits_are_configurable(engines):
    app = create_app(engines[:1], limits=dataclasses.replace(ChatLimits(), max_messages=1))
    with serve(app) as url:
        response = httpx.post(url + "/chat/completions",
                              json={"messages": [user("a"), {"role": "assistant", "content": "b"}, user("c")]})
    assert response.status_code == 400 and "too many messages" in response.json()["error"]


async def one_client(client: httpx.AsyncClient, i: int) -> tuple[int, list[dict]]:
    async with client.stream("POST", "/chat/completions",
                             json={"messages": [user(f"client {i}")], "max_tokens": 12}) as response:
        body = "".join([chunk async for chunk in response.aiter_text()])
    return response.status_code, (parse_events(body) if response.status_code == 200 else [json.loads(body)])


async def many_clients(url: str, count: int) -> list[tuple[int, list[dict]]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one_client(client, i) for i in range(count))), 90)


def test_hundred_concurrent_clients_all_finish(server):
    served_before = httpx.get(server + "/stats").json()["requests_served"]
    start = time.monotonic()
    results = asyncio.run(many_clients(server, 100))
    elapsed = time.monotonic() - start
    assert [status for status, _ in results] == [200] * 100
    gpus = set()
    for _, events in results:
        assert stream_text(events)
        gpus |= {e["gpu"] for e in events[:-1]}
    assert gpus == {0, 1}
    assert elapsed < 60
    assert httpx.get(server + "/health").json()["ready"] is True
    stats = httpx.get(server + "/stats").json()
    assert stats["requests_served"] == served_before + 100
    assert stats["busy"] == 0 and stats["queue_depth"] == 0


def test_full_queue_answers_503_and_recovers(tokenizer):
    slow = Engine(ScriptedModel(tokenizer.encode(" fox") * 50, delay_s=0.02), tokenizer)
    app = create_app([slow], max_queue=2)
    with serve(app) as url:
        results = asyncio.run(many_clients(url, 8))
        statuses = sorted(status for status, _ in results)
        assert statuses.count(200) >= 3 and statuses.count(503) >= 1 and set(statuses) == {200, 503}
        for status, events in results:
            if status == 503:
                assert "busy" in events[0]["error"]
            else:
                assert stream_text(events) == " fox" * 6  # 12 tokens: " fo", "x"
        assert httpx.get(url + "/health").json()["status"] == "ok"
        stats = httpx.get(url + "/stats").json()
        assert stats["requests_rejected"] == statuses.count(503)
        again = httpx.post(url + "/chat/completions", json={"messages": [user("again")], "max_tokens": 4})
        assert stream_text(parse_events(again.text)) == " fox" * 2


@pytest.fixture
def cli_cache(tokenizer, tmp_path, monkeypatch):
    """A cache holding the tokenizer and one 'base' checkpoint of the chatty model."""
    model = chatty_model(tokenizer, seed=1)
    tokenizer.save(tmp_path / "tokenizer")
    ckpt.save_checkpoint(tmp_path / "base_checkpoints" / "d2", 5, model.state_dict(), None,
                         {"model_config": dataclasses.asdict(model.config)})
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def test_cli_answers_one_prompt(cli_cache, capsys):
    assert chat_cli.cli(["-i", "base", "-p", "hello fox", "--max-tokens", "10", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip()) > 0 and "\ufffd" not in out


def test_cli_interactive_loop(cli_cache, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nclear\nfox?\nquit\nnever read\n"))
    assert chat_cli.cli(["-i", "base", "--max-tokens", "6", "--temperature", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "(new conversation)" in out


class InterruptedStream(chat_cli.TextStream):
    """A TextStream whose third token, in the first answer only, arrives with a Ctrl-C."""

    answers = 0

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        InterruptedStream.answers += 1
        self.pushed = 0

    def push(self, token):
        self.pushed += 1
        if InterruptedStream.answers == 1 and self.pushed == 3:
            raise KeyboardInterrupt
        return super().push(token)


class CtrlCAtThePrompt(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_cli_ctrl_c_stops_the_answer_and_the_chat_goes_on(cli_cache, capsys, monkeypatch):
    monkeypatch.setattr(chat_cli, "TextStream", InterruptedStream)
    InterruptedStream.answers = 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nfox?\n"))
    assert chat_cli.cli(["-i", "base", "--max-tokens", "8", "--temperature", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and out.count("(stopped)") == 1
    InterruptedStream.answers = 0
    assert chat_cli.cli(["-i", "base", "-p", "hello", "--max-tokens", "8", "--device-type", "cpu"]) == 130
    assert "(stopped)" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", CtrlCAtThePrompt())
    assert chat_cli.cli(["-i", "base", "--device-type", "cpu"]) == 0  # Ctrl-C at the prompt leaves quietly


def test_cli_missing_checkpoint_names_the_stage(cli_cache, capsys):
    assert chat_cli.cli(["--source", "sft", "-p", "hi", "--device-type", "cpu"]) == 2
    assert "scripts.chat_sft" in capsys.readouterr().err


def test_cli_unknown_device_is_a_usage_error(cli_cache, capsys):
    assert chat_cli.cli(["-i", "base", "-p", "hi", "--device-type", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device type 'gpu'") and "Traceback" not in err


def test_web_unknown_device_is_a_usage_error(cli_cache, capsys):
    assert chat_web.cli(["--source", "base", "--device-type", "gpu"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown device type 'gpu'")


def test_web_port_in_use_is_a_usage_error_before_loading(cli_cache, capsys, monkeypatch):
    """Port taken (a second server, say): one line naming --port and exit 2, not uvicorn's exit 3 after the load."""
    monkeypatch.setattr(chat_web, "load_model", lambda *a, **k: pytest.fail("loaded a model for a server that cannot listen"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert chat_web.cli(["--source", "base", "--device-type", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1


def test_cli_message_longer_than_the_context_is_refused_and_the_chat_goes_on(cli_cache, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("fox " * 2000 + "\nhello\n"))
    assert chat_cli.cli(["-i", "base", "--max-tokens", "4", "--temperature", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "the model reads at most 639" in out
    assert out.count("Assistant: ") == 1


def test_cli_input_that_is_not_utf8_is_refused_and_the_chat_goes_on(cli_cache, capsys, monkeypatch):
    """Python reads undecodable stdin bytes (a Latin-1 terminal's 'é') as lone surrogates."""
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9\nhello\n"))
    assert chat_cli.cli(["-i", "base", "--max-tokens", "4", "--temperature", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "not valid UTF-8" in out and out.count("Assistant: ") == 1


def test_cli_prompt_that_is_not_utf8_is_a_usage_error(cli_cache, capsys):
    assert chat_cli.cli(["-i", "base", "-p", "caf\udce9", "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt is not valid UTF-8") and err.count("\n") == 1


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_cli_temperature_must_be_finite_and_not_negative(cli_cache, capsys, value):
    assert chat_cli.cli(["-i", "base", "-p", "hi", "--temperature", value, "--device-type", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --temperature must be a finite number >= 0")
