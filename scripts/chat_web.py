"""Serve a trained model as a chat web app: `python -m scripts.chat_web [--source sft] [--port 8000]`.

One model replica per GPU (one on CPU), each generating in its own worker thread under its own lock, so the
event loop stays free. Requests wait in a bounded queue for a free replica; when the queue is full the
server answers 503. Routes:
  GET  /                  the single-page chat UI (nanochat/web/index.html, no external resources)
  POST /chat/completions  {"messages": [{"role": "user"|"assistant", "content": str}, ...],
                          "temperature"?, "top_k"?, "max_tokens"?} -> server-sent events
                          `data: {"token": str, "gpu": int}` per text chunk, then `data: {"done": true}`
  GET  /health            {"status": "ok", "ready": true}
  GET  /stats             replicas, busy, queue depth, requests served and rejected
Bad requests get a 400 with {"error": message}. Listens on 127.0.0.1 unless --host 0.0.0.0 is given.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.engine import Engine, TextStream
from nanochat.model_loading import load_model
from nanochat.runtime import print0, setup_runtime
from nanochat.tokenizer import is_utf8

SOURCE_PHASES = {"base": "base", "mid": "mid", "sft": "chatsft", "rl": "chatrl"}
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ChatLimits:
    """What one request may ask for; anything outside is a 400."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_tokens: int = 4096


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling used when a request leaves a setting out."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    temperature: float
    top_k: int
    max_tokens: int


class BadRequest(ValueError):
    """A request the server refuses with 400; the message says what is wrong."""


class QueueFull(RuntimeError):
    """Every replica is busy and the waiting queue is at its limit."""


def _number(body: dict, key: str, default, low, high, integer: bool):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"{key} must be {kind} in [{low}, {high}], got {value!r}")
    if not (low <= value <= high) or (not integer and not math.isfinite(value)):
        raise BadRequest(f"{key} must be in [{low}, {high}], got {value}")
    return value


def parse_chat_request(raw: bytes, limits: ChatLimits, defaults: SamplingDefaults) -> ChatRequest:
    """Validate a /chat/completions body; raises BadRequest with a message for the client."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with a 'messages' list")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"too many messages: {len(messages)} > {limits.max_messages}")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRequest(f"message {i} must be an object with a 'role' and a string 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"message {i} has role {role!r}; only 'user' and 'assistant' are allowed")
        expected = ROLES[i % 2]
        if role != expected:
            raise BadRequest(f"message {i} should be from the {expected}: messages alternate user/assistant, "
                             "starting with the user")
        if not is_utf8(message["content"]):
            raise BadRequest(f"message {i} contains a lone surrogate (half of a UTF-16 pair), which is not text")
        length = len(message["content"])
        if length > limits.max_message_chars:
            raise BadRequest(f"message {i} is {length} characters; the limit is {limits.max_message_chars}")
        total += length
    if total > limits.max_total_chars:
        raise BadRequest(f"the conversation is {total} characters; the limit is {limits.max_total_chars}")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    return ChatRequest(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        temperature=float(_number(body, "temperature", defaults.temperature, 0.0, limits.max_temperature, False)),
        top_k=_number(body, "top_k", defaults.top_k, 1, limits.max_top_k, True),
        max_tokens=_number(body, "max_tokens", defaults.max_tokens, 1, limits.max_tokens, True),
    )


class Replica:
    """One model copy with the single worker thread that runs its generations, guarded by its lock."""

    def __init__(self, index: int, engine: Engine):
        self.index = index
        self.engine = engine
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"replica{index}")


class ReplicaPool:
    """Hands out free replicas; at most `max_queue` requests wait for one."""

    def __init__(self, replicas: Sequence[Replica], max_queue: int):
        self.replicas = list(replicas)
        self.max_queue = max_queue
        self.free: asyncio.Queue[Replica] = asyncio.Queue()
        for replica in self.replicas:
            self.free.put_nowait(replica)
        self.waiting = 0
        self.served = 0
        self.rejected = 0

    async def acquire(self) -> Replica:
        if self.free.empty() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise QueueFull(f"server busy: {self.waiting} requests are already waiting; try again shortly")
        self.waiting += 1
        try:
            return await self.free.get()
        finally:
            self.waiting -= 1

    def release(self, replica: Replica) -> None:
        self.served += 1
        self.free.put_nowait(replica)

    def stats(self) -> dict[str, int]:
        return {"replicas": len(self.replicas), "busy": len(self.replicas) - self.free.qsize(),
                "queue_depth": self.waiting, "max_queue": self.max_queue, "requests_served": self.served,
                "requests_rejected": self.rejected}


_DONE = object()


class Generation:
    """One answer: produced token by token in the replica's thread, read as events by the response."""

    def __init__(self, replica: Replica, prompt_ids: list[int], request: ChatRequest, seed: int):
        self.replica = replica
        self.prompt_ids = prompt_ids
        self.request = request
        self.seed = seed
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def _emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def run(self) -> None:
        """Runs in the replica's worker thread."""
        engine, request = self.replica.engine, self.request
        stream = TextStream(engine.tokenizer)
        try:
            with self.replica.lock:
                for tokens, _ in engine.generate(self.prompt_ids, max_tokens=request.max_tokens,
                                                 temperature=request.temperature, top_k=request.top_k,
                                                 seed=self.seed):
                    if self.cancelled.is_set() or tokens[0] in engine.stop_ids:
                        break
                    text = stream.push(tokens[0])
                    if text:
                        self._emit({"token": text, "gpu": self.replica.index})
            tail = stream.flush()
            if tail:
                self._emit({"token": tail, "gpu": self.replica.index})
        except Exception as exc:  # the client gets the error; the server keeps running
            traceback.print_exc()
            self._emit({"error": f"generation failed: {exc}"})
        finally:
            self._emit(_DONE)

    async def server_sent_events(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self.events.get()
                if item is _DONE:
                    yield "data: " + json.dumps({"done": True}) + "\n\n"
                    return
                yield "data: " + json.dumps(item, ensure_ascii=False) + "\n\n"
        finally:
            self.cancelled.set()


def create_app(engines: Sequence[Engine], limits: ChatLimits = ChatLimits(),
               defaults: SamplingDefaults = SamplingDefaults(), max_queue: int = 256, seed: int = 42) -> FastAPI:
    """The chat app over one replica per engine (all engines must share one tokenizer and context size)."""
    if not engines:
        raise ValueError("create_app needs at least one engine")
    replicas = [Replica(i, engine) for i, engine in enumerate(engines)]
    tokenizer, max_context = engines[0].tokenizer, engines[0].max_context
    index_html = resources.files("nanochat").joinpath("web/index.html").read_text(encoding="utf-8")
    request_seeds = itertools.count(seed)
    state: dict[str, ReplicaPool] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["pool"] = ReplicaPool(replicas, max_queue)
        yield
        for replica in replicas:
            replica.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanochat", lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "ready": "pool" in state}

    @app.get("/stats")
    async def stats() -> dict:
        return state["pool"].stats()

    @app.post("/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            request = parse_chat_request(await http_request.body(), limits, defaults)
            prompt_ids = tokenizer.render_for_completion({"messages": request.messages})
            if len(prompt_ids) >= max_context:
                raise BadRequest(f"the conversation is {len(prompt_ids)} tokens; the model reads at most "
                                 f"{max_context - 1}: start a new chat")
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        pool = state["pool"]
        try:
            replica = await pool.acquire()
        except QueueFull as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        generation = Generation(replica, prompt_ids, request, next(request_seeds))
        job = asyncio.get_running_loop().run_in_executor(replica.worker, generation.run)
        job.add_done_callback(lambda _: pool.release(replica))
        return StreamingResponse(generation.server_sent_events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


@dataclass
class ChatWebConfig:
    """Serve a trained model as a chat web app."""

    source: Literal["base", "mid", "sft", "rl"] = field(default="sft", metadata={"help": "which phase's model"})
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint folder (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on; 0.0.0.0 exposes the server"})
    port: int = 8000
    num_replicas: int | None = field(default=None, metadata={"help": "model copies (default: one per GPU, else 1)"})
    max_queue: int = field(default=256, metadata={"help": "requests that may wait for a replica before 503"})
    temperature: float = field(default=0.8, metadata={"help": "default sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "default top-k"})
    max_tokens: int = field(default=512, metadata={"help": "default answer length limit in tokens"})
    seed: int = 42
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})

    def __post_init__(self) -> None:
        require(0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}")
        require(self.num_replicas is None or self.num_replicas >= 1, "--num-replicas must be >= 1")
        require(self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}")
        limits = ChatLimits()
        require(0 <= self.temperature <= limits.max_temperature,
                f"--temperature must be in [0, {limits.max_temperature}]")
        require(1 <= self.top_k <= limits.max_top_k, f"--top-k must be in [1, {limits.max_top_k}]")
        require(1 <= self.max_tokens <= limits.max_tokens, f"--max-tokens must be in [1, {limits.max_tokens}]")


def replica_devices(device: torch.device, num_replicas: int | None) -> list[torch.device]:
    """One device per replica: cuda:0..n-1 on a GPU machine, else the runtime's device n times."""
    if device.type != "cuda":
        return [device] * (num_replicas or 1)
    available = torch.cuda.device_count()
    count = num_replicas or available
    if count > available:
        raise UsageError(f"--num-replicas {count} needs {count} GPUs but {available} are visible")
    return [torch.device("cuda", i) for i in range(count)]


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads: a taken port or unknown host is a one-line usage
    error at once, not uvicorn's exit 3 (this project's "diverged" status) after the load."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}; use 127.0.0.1 (this machine only) or 0.0.0.0") from exc
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); stop the server using it or "
                         f"choose a free port with --port") from exc
    return listener


def main(config: ChatWebConfig) -> int:
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    listener = bind_listener(config.host, config.port)
    engines = []
    for device in replica_devices(runtime.device, config.num_replicas):
        loaded = load_model(SOURCE_PHASES[config.source], device, tag=config.model_tag, step=config.step,
                            dtype=torch.bfloat16 if device.type == "cuda" else None)
        engines.append(Engine(loaded.model, loaded.tokenizer, decode="auto"))
        warm_up_s = engines[-1].warm_up()
        print0(runtime, f"replica {len(engines) - 1}: {config.source} model {loaded.tag} step {loaded.step} "
                        f"on {device} (decoder ready in {warm_up_s:.1f} s)")
    defaults = SamplingDefaults(config.temperature, config.top_k, config.max_tokens)
    app = create_app(engines, defaults=defaults, max_queue=config.max_queue, seed=config.seed)
    print0(runtime, f"chat UI at http://{config.host}:{config.port}/")
    uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info")).run(sockets=[listener])
    return EXIT_OK


def cli(argv: Sequence[str] | None = None) -> int:
    return run_stage(main, ChatWebConfig, argv, prog="python -m scripts.chat_web")


if __name__ == "__main__":
    sys.exit(cli())
