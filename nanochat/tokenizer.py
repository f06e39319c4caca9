"""The BPE tokenizer: training, encoding, chat rendering and per-token byte lengths.

The vocabulary is byte-level BPE trained with the HuggingFace `tokenizers` library. Text is first split
GPT-4 style (letters, punctuation runs, whitespace), except that digits go in groups of one or two so
numbers tokenize the same way everywhere. Every byte is in the vocabulary, so any UTF-8 text round-trips
and no unknown token exists. The chat special tokens come first (ids 0..8); `vocab_size` counts them.
Special-token strings that appear in ordinary text are encoded as plain text, so user input cannot
inject them; code asks for their ids with `special_id`.

`iter_parquet_texts` reads the pretraining shards the way tokenizer training and
evaluation need them.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanochat.configargs import UsageError
from nanochat.dataloader import parquet_shard, read_texts

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
TRAIN_COMMAND = "python -m scripts.tok_train"

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# GPT-4's pre-split with numbers in runs of at most two digits.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?+\p{L}+"
    r"|\p{N}{1,2}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s+(?!\S)"
    r"|\s+"
)

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

ASSISTANT_PART_TYPES = ("text", "python", "python_output")



def is_utf8(text: str) -> bool:
    """False for a str the tokenizer cannot take: one read from bytes that are not UTF-8 (Python keeps them
    as lone surrogates) or holding half of a UTF-16 pair."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, NBSP, soft hyphen) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(BYTE_ALPHABET_SIZE) if b not in set(printable)]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(BYTE_ALPHABET_SIZE + i): b for i, b in enumerate(others)})
    return alphabet


_BYTE_OF_CHAR = _byte_level_alphabet()

# Whether this process has run the library's parallel (rayon) encoder yet; its thread count is fixed then.
_parallel_pool_started = False


def _new_hf_tokenizer() -> HFTokenizer:
    hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = None
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Learn a vocabulary of exactly `vocab_size` ids (special tokens included) from `texts`.

    Raises ValueError when `vocab_size` is below 256 bytes + the special tokens, or when the text is too
    small to learn that many merges.
    """
    global _parallel_pool_started
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    hf = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
    )
    hf.train_from_iterator(texts, trainer=trainer)
    _parallel_pool_started = True
    learned = hf.get_vocab_size(with_added_tokens=True)
    if learned != vocab_size:
        raise ValueError(f"the training text only supports {learned} tokens, not the requested {vocab_size}; "
                         "give more text or ask for a smaller vocabulary")
    return Tokenizer(hf)


class Tokenizer:
    """A trained byte-level BPE vocabulary plus the chat format built on its special tokens."""

    def __init__(self, hf: HFTokenizer):
        missing = [name for name in SPECIAL_TOKENS if hf.token_to_id(name) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        hf.encode_special_tokens = True  # special-token strings in text are split like any other text
        self._hf = hf
        self._special_ids = {name: hf.token_to_id(name) for name in SPECIAL_TOKENS}
        self._special_id_set = frozenset(self._special_ids.values())

    @classmethod
    def load(cls, directory: Path | str) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UsageError(f"no tokenizer at {path}; train one with `{TRAIN_COMMAND}`")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise _damaged(path, exc) from exc

    def save(self, directory: Path | str) -> Path:
        """Write `directory/tokenizer.json` (via a temporary name, so readers never see half a file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        tmp = directory / f".{TOKENIZER_FILE}.tmp{os.getpid()}"
        self._hf.save(str(tmp))
        os.replace(tmp, path)
        return path

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        """The id of a special token given by its full string, e.g. `special_id("<|user_start|>")`."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; expected one of {', '.join(SPECIAL_TOKENS)}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_id_set

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry for an id: a special token's string, or the token's bytes written in the
        byte-level alphabet (one character per byte, e.g. 'Ġthe' for b' the')."""
        token = self._hf.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return token

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a special token's UTF-8 string for special ids). Single
        tokens may hold part of a multi-byte character, so they are bytes, not text."""
        token = self.id_to_token(token_id)
        if self.is_special(token_id):
            return token.encode("utf-8")
        return bytes(_BYTE_OF_CHAR[ch] for ch in token)

    def _edge_id(self, token: int | str | None) -> list[int]:
        if token is None:
            return []
        if isinstance(token, str):
            return [self.special_id(token)]
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
        return [int(token)]

    def encode(self, text_or_list: str | Sequence[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 0,
               batch_size: int = 1024) -> list[int] | list[list[int]]:
        """Token ids of one text (a list of ids) or of a list of texts (a list of id lists).

        `prepend`/`append` add one token at the start/end of every text: an id or a special token's
        string such as "<|bos|>". A list is encoded `batch_size` texts at a time with the library's
        parallel batch encoder. `num_threads` chooses the parallelism of list encoding:
          0   the library's worker pool as it is (all cores, or $RAYON_NUM_THREADS if set before its first
              use in this process);
          1   no worker threads: texts are encoded one by one in the calling thread (for callers that
              already run one process per core, such as data-loader threads of distributed ranks);
          n>1 sizes the library's worker pool to n threads by setting RAYON_NUM_THREADS, but only when
              the pool has not started yet in this process and the variable is unset; otherwise the
              existing pool is used unchanged, because its size cannot change once it runs.
        """
        head, tail = self._edge_id(prepend), self._edge_id(append)
        if isinstance(text_or_list, str):
            return head + self._hf.encode(text_or_list, add_special_tokens=False).ids + tail
        if num_threads < 0 or batch_size < 1:
            raise ValueError(f"num_threads must be >= 0 and batch_size >= 1, got {num_threads}, {batch_size}")
        texts = list(text_or_list)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a str or a list of str")
        if num_threads == 1:
            return [head + self._hf.encode(t, add_special_tokens=False).ids + tail for t in texts]
        _size_parallel_pool(num_threads)
        out: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            batch = self._hf.encode_batch_fast(texts[start:start + batch_size], add_special_tokens=False)
            out.extend(head + enc.ids + tail for enc in batch)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids; special tokens appear as their strings."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """int32 tensor of length vocab_size: each token's UTF-8 byte length, 0 for special tokens.
        Summing it over a text's ids gives the text's byte count (used for bits per byte)."""
        lengths = [0 if self.is_special(i) else len(self.token_to_bytes(i)) for i in range(self.vocab_size)]
        return torch.tensor(lengths, dtype=torch.int32)

    def render_conversation(self, conversation: Mapping[str, Any], max_tokens: int) -> tuple[list[int], list[int]]:
        """Token ids of a chat and a same-length mask that is 1 exactly on the tokens the assistant writes.

        Layout: <|bos|>, then <|user_start|> text <|user_end|> for each user turn and
        <|assistant_start|> ... <|assistant_end|> for each assistant turn. The mask is 1 on the assistant's
        content (python parts with their <|python_start|>/<|python_end|>) and its <|assistant_end|>; 0 on
        everything else, including python_output parts, which the tool writes at inference. A leading
        system message is merged into the first user message. The result is cut to `max_tokens`.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ids, mask = self._render(_chat_turns(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Mapping[str, Any]) -> list[int]:
        """The prompt for the assistant's next reply: the chat without its final assistant message (if it
        ends with one), followed by <|assistant_start|>."""
        turns = _chat_turns(conversation)
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        ids, _ = self._render(turns)
        return ids + [self.special_id("<|assistant_start|>")]

    def _render(self, turns: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []

        def add(token_ids: list[int], learn: int) -> None:
            ids.extend(token_ids)
            mask.extend([learn] * len(token_ids))

        sid = self.special_id
        add([self.bos_id], 0)
        for turn in turns:
            if turn["role"] == "user":
                add([sid("<|user_start|>")] + self.encode(turn["content"]) + [sid("<|user_end|>")], 0)
                continue
            add([sid("<|assistant_start|>")], 0)
            for part_type, text in _assistant_parts(turn["content"]):
                if part_type == "text":
                    add(self.encode(text), 1)
                elif part_type == "python":
                    add([sid("<|python_start|>")] + self.encode(text) + [sid("<|python_end|>")], 1)
                else:
                    add([sid("<|output_start|>")] + self.encode(text) + [sid("<|output_end|>")], 0)
            add([sid("<|assistant_end|>")], 1)
        return ids, mask


def _chat_turns(conversation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validated messages alternating user/assistant from a user turn, with a system message merged in."""
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [...]} with at least one message')
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    turns = [dict(m) for m in messages]
    if turns[0]["role"] == "system":
        if len(turns) < 2 or turns[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        system, user = turns[0]["content"], turns[1]["content"]
        if not isinstance(system, str) or not isinstance(user, str):
            raise ValueError("system and user content must be strings")
        turns = [{"role": "user", "content": f"{system}\n\n{user}"}] + turns[2:]
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(f"turn {i} has role {turn['role']!r}, expected {expected!r}: messages alternate "
                             "user/assistant starting with user (after an optional leading system message)")
        if expected == "user" and not isinstance(turn["content"], str):
            raise ValueError(f"turn {i}: user content must be a string")
        if expected == "assistant":
            _assistant_parts(turn["content"])
    return turns


def _assistant_parts(content: Any) -> list[tuple[str, str]]:
    """(type, text) pairs of an assistant message: a plain string is one text part."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError("assistant content must be a string or a list of parts")
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ASSISTANT_PART_TYPES \
                or not isinstance(part.get("text"), str):
            raise ValueError(f"assistant part {part!r} must be {{'type': one of {ASSISTANT_PART_TYPES}, "
                             "'text': str}")
        parts.append((part["type"], part["text"]))
    return parts


def _size_parallel_pool(num_threads: int) -> None:
    global _parallel_pool_started
    if num_threads > 1 and not _parallel_pool_started and "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    _parallel_pool_started = True


def load_token_bytes(directory: Path | str) -> torch.Tensor:
    """The int32 per-token byte lengths that tok_train saved next to tokenizer.json."""
    path = Path(directory) / TOKEN_BYTES_FILE
    if not path.is_file():
        raise UsageError(f"no token byte lengths at {path}; train the tokenizer with `{TRAIN_COMMAND}`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise _damaged(path, exc) from exc


def _damaged(path: Path, exc: Exception) -> UsageError:
    reason = " ".join(str(exc).split(". ")[0].split()) or type(exc).__name__
    return UsageError(f"{path} is not readable ({reason}); restore it from a copy, or rebuild the tokenizer "
                      f"with `{TRAIN_COMMAND} --force`")


def iter_parquet_texts(shards: Sequence[Path], max_chars: int, doc_cap: int | None = None) -> Iterator[str]:
    """Documents from the `text` column of the shards, one row group in memory at a time.

    Each document is cut to `doc_cap` characters (when given); the stream ends once `max_chars` characters
    have been yielded, the last document cut to fit.
    """
    remaining = max_chars
    if remaining <= 0:
        return
    for shard in shards:
        parquet = parquet_shard(shard)
        if "text" not in parquet.schema_arrow.names:
            raise UsageError(f"{shard} has no 'text' column; regenerate the data")
        for group in range(parquet.num_row_groups):
            for text in read_texts(shard, group):
                text = (text or "")[:doc_cap][:remaining]
                if not text:
                    continue
                remaining -= len(text)
                yield text
                if remaining <= 0:
                    return
