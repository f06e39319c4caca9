"""The chat UI end to end in headless Chromium: type, send, watch the answer stream in, start a new chat.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with httpx (no extra Python package).
Install the browser with `bash .ci/install_browser.sh`. Without it the test is skipped, unless $CI is set,
where a missing browser is a failure.
"""

import base64
import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import torch
from test_chat_web import TEXT, VOCAB, chatty_model, serve
from torch import nn

from nanochat.engine import Engine
from nanochat.tokenizer import train_tokenizer
from scripts.chat_web import SamplingDefaults, create_app

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,800"]
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
ENTER_KEY = "\ue007"
ANSWER_TOKENS = 40
LAST_ASSISTANT_JS = """
const all = document.querySelectorAll('.message.assistant');
if (!all.length) return null;
const last = all[all.length - 1];
return {text: last.textContent, streaming: last.classList.contains('streaming'), count: all.length,
        error: last.classList.contains('error')};
"""


def find_browser() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "chromium and chromedriver are needed: run `bash .ci/install_browser.sh`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class PacedModel(nn.Module):
    """The tiny model, slowed to one forward pass per `delay_s` so the browser can watch the text grow."""

    def __init__(self, model: nn.Module, delay_s: float):
        super().__init__()
        self.model, self.delay_s = model, delay_s
        self.config, self.rotary_len = model.config, model.rotary_len

    def forward(self, idx, kv_cache):
        time.sleep(self.delay_s)
        return self.model(idx, kv_cache=kv_cache)


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's HTTP API."""

    def __init__(self, driver_path: str, chromium_path: str, profile_dir: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.process = subprocess.Popen([driver_path, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        options = {"binary": chromium_path, "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]}
        session = self._call("POST", "/session",
                             {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, payload: dict | None = None):
        response = self.http.request(method, path, json=payload)
        assert response.status_code == 200, response.text[:2000]
        return response.json()["value"]

    def command(self, method: str, path: str, payload: dict | None = None):
        return self._call(method, self.session + path, payload)

    def element(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def script(self, source: str):
        return self.command("POST", "/execute/sync", {"script": source, "args": []})

    def close(self) -> None:
        try:
            self.http.delete(self.session)
        finally:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.http.close()


def watch_answer(driver: WebDriver, expected_count: int, timeout_s: float = 30) -> tuple[dict, set[int]]:
    """Poll the newest assistant message until it stops streaming; return it and the lengths seen."""
    lengths: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = driver.script(LAST_ASSISTANT_JS)
        if state and state["count"] == expected_count:
            lengths.add(len(state["text"]))
            if not state["streaming"]:
                return state, lengths
        time.sleep(0.03)
    raise AssertionError(f"no finished answer within {timeout_s} s (lengths seen: {sorted(lengths)})")


def test_chat_in_headless_chromium(tmp_path):
    chromium, chromedriver = find_browser()
    tokenizer = train_tokenizer([TEXT.format(i=i) for i in range(200)], VOCAB)
    model = chatty_model(tokenizer)
    engine = Engine(PacedModel(model, delay_s=0.04), tokenizer)
    app = create_app([engine], defaults=SamplingDefaults(temperature=0.0, top_k=50, max_tokens=ANSWER_TOKENS))
    with serve(app) as url:
        driver = WebDriver(chromedriver, chromium, str(tmp_path / "profile"))
        try:
            driver.command("POST", "/url", {"url": url + "/"})
            assert driver.command("GET", "/title") == "nanochat"
            box = driver.element("#input")
            driver.command("POST", f"/element/{box}/value", {"text": "hello fox"})
            driver.command("POST", f"/element/{driver.element('#send')}/click", {})
            answer, lengths = watch_answer(driver, expected_count=1)
            assert not answer["error"], answer["text"]
            prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hello fox"}]})
            with torch.no_grad():
                expected, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=ANSWER_TOKENS,
                                                                      temperature=0.0)
            assert answer["text"] == tokenizer.decode(expected[0])
            assert len(lengths) >= 3, f"the answer did not visibly stream: lengths {sorted(lengths)}"

            driver.command("POST", f"/element/{driver.element('#input')}/value", {"text": "and then?" + ENTER_KEY})
            second, _ = watch_answer(driver, expected_count=2)
            assert second["text"] and not second["error"]
            users = driver.script("return [...document.querySelectorAll('.message.user')].map(e => e.textContent)")
            assert users == ["hello fox", "and then?"]

            png = base64.b64decode(driver.command("GET", "/screenshot"))
            shot = tmp_path / "chat.png"
            shot.write_bytes(png)
            assert shot.stat().st_size > 1000 and png.startswith(b"\x89PNG")

            driver.command("POST", f"/element/{driver.element('#new-chat')}/click", {})
            assert driver.script("return document.querySelectorAll('.message').length") == 0
        finally:
            driver.close()
