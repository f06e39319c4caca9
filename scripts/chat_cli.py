"""Talk to a trained model in the terminal: `python -m scripts.chat_cli [-i sft] [-p "question"]`.

With `-p/--prompt` it prints one answer and exits; otherwise it reads messages in a loop (`quit`, `exit`,
end-of-file or Ctrl-C at the prompt leave, `clear` starts a new conversation). Answers stream as they are
generated; Ctrl-C during an answer stops that answer (the conversation keeps what was said; with `-p` the
command exits 130). The calculator tool runs inside the engine. A missing checkpoint exits 2 naming the
stage that writes it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanochat.configargs import EXIT_INTERRUPTED, EXIT_OK, UsageError, require, run_stage
from nanochat.engine import Engine, TextStream
from nanochat.model_loading import load_model
from nanochat.runtime import setup_runtime
from nanochat.tokenizer import is_utf8

# The chat CLI's source names and the checkpoint phases they read.
SOURCE_PHASES = {"base": "base", "mid": "mid", "sft": "chatsft", "rl": "chatrl"}
SHORT_FLAGS = {"-i": "--source", "-p": "--prompt"}
QUIT_WORDS = ("quit", "exit")


@dataclass
class ChatCliConfig:
    """Chat with a trained model in the terminal."""

    source: Literal["base", "mid", "sft", "rl"] = field(
        default="sft", metadata={"help": "which training phase's model to load (-i)"})
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint folder (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    prompt: str | None = field(default=None, metadata={"help": "answer this one message and exit (-p)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature; 0 is greedy"})
    top_k: int = field(default=50, metadata={"help": "sample among the k most likely tokens"})
    max_tokens: int = field(default=512, metadata={"help": "longest answer in tokens"})
    seed: int = 42
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})

    def __post_init__(self) -> None:
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                f"--temperature must be a finite number >= 0, got {self.temperature}")
        require(self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}")
        require(self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")
        require(self.prompt is None or self.prompt.strip() != "", "--prompt must not be empty")
        require(self.prompt is None or is_utf8(self.prompt),
                "--prompt is not valid UTF-8 text; set the terminal's encoding to UTF-8")



def stream_answer(engine: Engine, prompt_ids: list[int], config: ChatCliConfig,
                  seed: int) -> tuple[list[int], bool]:
    """Print the answer as it is generated; (its tokens without the stop token, whether Ctrl-C cut it short)."""
    stream = TextStream(engine.tokenizer)
    answer: list[int] = []
    generation = engine.generate(prompt_ids, max_tokens=config.max_tokens, temperature=config.temperature,
                                 top_k=config.top_k, seed=seed)
    try:
        with contextlib.closing(generation):
            for tokens, _ in generation:
                token = tokens[0]
                if token in engine.stop_ids:
                    break
                answer.append(token)
                print(stream.push(token), end="", flush=True)
    except KeyboardInterrupt:
        print(stream.flush() + " (stopped)", flush=True)
        return answer, True
    print(stream.flush(), flush=True)
    return answer, False


def user_turn_ids(engine: Engine, text: str) -> list[int]:
    """<|user_start|> text <|user_end|> <|assistant_start|>: the tokenizer's chat rendering, minus <|bos|>."""
    return engine.tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})[1:]


def main(config: ChatCliConfig) -> int:
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    loaded = load_model(SOURCE_PHASES[config.source], runtime.device, tag=config.model_tag, step=config.step,
                        dtype=torch.bfloat16 if runtime.device_type == "cuda" else None)
    engine = Engine(loaded.model, loaded.tokenizer, decode="auto")
    bos, assistant_end = loaded.tokenizer.bos_id, loaded.tokenizer.special_id("<|assistant_end|>")
    if config.prompt is not None:
        prompt_ids = [bos, *user_turn_ids(engine, config.prompt)]
        require(len(prompt_ids) < engine.max_context,
                f"--prompt is {len(prompt_ids)} tokens; the model reads at most {engine.max_context - 1}")
        _, interrupted = stream_answer(engine, prompt_ids, config, config.seed)
        return EXIT_INTERRUPTED if interrupted else EXIT_OK

    engine.warm_up()
    print(f"nanochat {config.source} model {loaded.tag} step {loaded.step}. "
          "Type 'quit' or 'exit' to leave, 'clear' for a new conversation.", flush=True)
    conversation = [bos]
    for turn in itertools.count():
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return EXIT_OK
        if text.lower() in QUIT_WORDS:
            return EXIT_OK
        if text.lower() == "clear":
            conversation = [bos]
            print("(new conversation)")
            continue
        if not text:
            continue
        if not is_utf8(text):
            print("(that message is not valid UTF-8 text; set the terminal's encoding to UTF-8)")
            continue
        turn_ids = user_turn_ids(engine, text)
        if 1 + len(turn_ids) >= engine.max_context:
            print(f"(that message is {1 + len(turn_ids)} tokens; the model reads at most {engine.max_context - 1}: "
                  "send a shorter one)")
            continue
        conversation += turn_ids
        if len(conversation) >= engine.max_context:
            print(f"(the conversation no longer fits in {engine.max_context} tokens; starting a new one)")
            conversation = [bos, *turn_ids]
        print("\nAssistant: ", end="", flush=True)
        answer, _ = stream_answer(engine, conversation, config, config.seed + turn)
        conversation += answer + [assistant_end]


def expand_short_flags(argv: Sequence[str]) -> list[str]:
    """Accept -i and -p as spellings of --source and --prompt."""
    return [SHORT_FLAGS.get(arg, arg) for arg in argv]


def cli(argv: Sequence[str] | None = None) -> int:
    args = expand_short_flags(sys.argv[1:] if argv is None else argv)
    return run_stage(main, ChatCliConfig, args, prog="python -m scripts.chat_cli")


if __name__ == "__main__":
    sys.exit(cli())
