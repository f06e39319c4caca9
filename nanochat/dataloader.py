"""Pretraining batches: parquet row groups -> tokens -> BOS-aligned best-fit packed rows, resumable exactly.

`PackedTokenLoader` streams the `text` column of parquet shards one row group at a time. Row groups are
numbered globally across the ordered shard list and rank r reads those with `index % world_size == r`; the
stream loops forever, counting epochs. A background thread reads, tokenizes (every document gets a BOS
in front) and packs ahead of training into a bounded queue.

Packing: a buffer holds up to `buffer_size` tokenized documents in arrival order. Each row of exactly T+1
tokens is filled by repeatedly taking the longest buffered document that fits the space left (the earliest
on ties); when none fits, the shortest is cropped to fill the row and its remainder is dropped. So every row
starts with a BOS, and a batch is `(inputs, targets) = (rows[:, :-1], rows[:, 1:])` as int64 (B, T).

Resume: `state_dict()` describes where the batch after the last one handed out comes from: the stream
cursor (epoch, shard, row group, row) and the identities (shard, row group, row) of the buffered documents
in buffer order. A new loader re-reads and re-tokenizes those documents, so it yields exactly the batches
the original would have yielded next. The state is recorded with each batch in the background thread and
adopted when the consumer receives that batch, so read-ahead never leaks into it.

Evaluation builds a fresh loader over the validation shard and takes its first N batches: a loader without
a state always starts at the beginning, so every evaluation sees the same batches.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.configargs import UsageError
from nanochat.paths import shard_paths

STATE_FORMAT = 1
TEXT_COLUMN = "text"
COUNTERS = ("batches_yielded", "documents_consumed", "tokens_cropped")


class DocumentTokenizer(Protocol):
    bos_id: int

    def encode(self, texts: list[str], prepend: int | None = None, num_threads: int = 0) -> list[list[int]]: ...


class DocId(NamedTuple):
    """Where one document lives: row `row` of row group `row_group` of the `shard`-th shard in the list."""

    shard: int
    row_group: int
    row: int


@dataclass(frozen=True)
class Cursor:
    """Where the document stream continues. `global_row_group` is the index of (shard, row_group) counted
    over all shards in order; it decides which rank reads a row group."""

    epoch: int = 0
    shard: int = 0
    row_group: int = 0
    row: int = 0
    global_row_group: int = 0


def split_shards(data_dir: Path, split: Literal["train", "val"]) -> list[Path]:
    """All shards but the last for "train", the last one for "val"."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    shards = shard_paths(data_dir)
    if len(shards) < 2:
        raise UsageError(
            f"{data_dir} holds {len(shards)} parquet shard(s) but training needs at least 2 (train + val): "
            "run `python -m scripts.demo_data` or `bash scripts/download_data.sh`"
        )
    return shards[:-1] if split == "train" else shards[-1:]


def shard_fingerprint(shards: Sequence[Path]) -> str:
    """Identifies a shard list by its file names (not their folder, so a moved cache still resumes)."""
    return hashlib.sha256("\n".join(Path(p).name for p in shards).encode()).hexdigest()


def _unreadable(shard: Path, exc: Exception) -> UsageError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return UsageError(f"{shard} is not a readable parquet shard ({reason}); delete it and fetch it again: "
                      "`bash scripts/download_data.sh`, or `python -m scripts.demo_data --force` for the demo corpus")


def parquet_shard(shard: Path) -> pq.ParquetFile:
    """The shard opened for reading; a file that is not parquet (cut short, zeroed) is a UsageError naming it."""
    try:
        return pq.ParquetFile(shard)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(shard, exc) from exc


def read_texts(shard: Path, row_group: int) -> list[str]:
    """The `text` column of one row group of the shard (a damaged one is a UsageError naming it)."""
    try:
        table = parquet_shard(shard).read_row_group(row_group, columns=[TEXT_COLUMN])
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(shard, exc) from exc
    return table.column(TEXT_COLUMN).to_pylist()


def iter_documents(shards: Sequence[Path], rank: int, world_size: int,
                   start: Cursor = Cursor()) -> Iterator[tuple[DocId, str, Cursor]]:
    """This rank's documents from `start` on, forever: (identity, text, cursor just after this document)."""
    epoch, shard, row_group, row, global_row_group = dataclasses.astuple(start)
    while True:
        from_epoch_start = (shard, row_group, row) == (0, 0, 0)
        found = False
        while shard < len(shards):
            num_row_groups = parquet_shard(shards[shard]).num_row_groups
            if row > 0 and row_group >= num_row_groups:
                raise ValueError(f"loader cursor points at row group {row_group} of {shards[shard]}, "
                                 f"which has {num_row_groups}; was the data regenerated?")
            while row_group < num_row_groups:
                if global_row_group % world_size == rank:
                    texts = read_texts(shards[shard], row_group)
                    if row > len(texts):
                        raise ValueError(f"loader cursor points at row {row} of row group {row_group} of "
                                         f"{shards[shard]}, which has {len(texts)}; was the data regenerated?")
                    for index in range(row, len(texts)):
                        found = True
                        yield (DocId(shard, row_group, index), texts[index],
                               Cursor(epoch, shard, row_group, index + 1, global_row_group))
                row_group, row, global_row_group = row_group + 1, 0, global_row_group + 1
            shard, row_group = shard + 1, 0
        if from_epoch_start and not found:
            raise UsageError(f"rank {rank} of {world_size} gets no documents from the {len(shards)} shard(s) "
                             f"({global_row_group} row groups in all); write shards with more non-empty row "
                             "groups than ranks, or use fewer ranks")
        epoch, shard, row_group, row, global_row_group = epoch + 1, 0, 0, 0, 0


def read_documents(shards: Sequence[Path], ids: Sequence[DocId]) -> list[str]:
    """The texts of the given documents, reading each row group once."""
    tables: dict[tuple[int, int], list[str]] = {}
    texts = []
    for doc in ids:
        if not 0 <= doc.shard < len(shards):
            raise ValueError(f"loader state names shard {doc.shard}, but there are {len(shards)}")
        key = (doc.shard, doc.row_group)
        if key not in tables:
            num_row_groups = parquet_shard(shards[doc.shard]).num_row_groups
            if not 0 <= doc.row_group < num_row_groups:
                raise ValueError(f"loader state names row group {doc.row_group} of {shards[doc.shard]}, "
                                 f"which has {num_row_groups}; was the data regenerated?")
            tables[key] = read_texts(shards[doc.shard], doc.row_group)
        rows = tables[key]
        if not 0 <= doc.row < len(rows):
            raise ValueError(f"loader state names row {doc.row} of row group {doc.row_group} of "
                             f"{shards[doc.shard]}, which has {len(rows)}; was the data regenerated?")
        texts.append(rows[doc.row])
    return texts


class BestFitPacker:
    """Packs a stream of tokenized documents into rows of exactly `row_len` tokens, each starting at the
    start of a document, keeping up to `buffer_size` documents to choose from."""

    def __init__(self, stream: Iterator[tuple[DocId, list[int], Cursor]], row_len: int, buffer_size: int,
                 cursor: Cursor):
        self.stream = stream
        self.row_len = row_len
        self.buffer_size = buffer_size
        self.cursor = cursor
        self.documents_consumed = 0
        self.tokens_cropped = 0
        self._docs: dict[int, tuple[DocId, list[int]]] = {}  # arrival number -> document, in arrival order
        self._by_length: list[tuple[int, int]] = []  # sorted (length, -arrival): ties favour the earliest
        self._arrivals = itertools.count()

    def add(self, doc: DocId, tokens: list[int]) -> None:
        arrival = next(self._arrivals)
        self._docs[arrival] = (doc, tokens)
        bisect.insort(self._by_length, (len(tokens), -arrival))

    def buffered(self) -> list[DocId]:
        return [doc for doc, _ in self._docs.values()]

    def _take(self, position: int) -> list[int]:
        _, negative_arrival = self._by_length.pop(position)
        return self._docs.pop(-negative_arrival)[1]

    def _last_not_longer_than(self, length: int) -> int:
        """Position in `_by_length` of the earliest-arrived longest document of at most `length` tokens."""
        return bisect.bisect_right(self._by_length, (length, 1)) - 1

    def _refill(self) -> None:
        while len(self._docs) < self.buffer_size:
            doc, tokens, self.cursor = next(self.stream)
            self.add(doc, tokens)

    def next_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.row_len:
            self._refill()
            space = self.row_len - len(row)
            position = self._last_not_longer_than(space)
            if position >= 0:
                row.extend(self._take(position))
            else:
                shortest = self._take(self._last_not_longer_than(self._by_length[0][0]))
                row.extend(shortest[:space])
                self.tokens_cropped += len(shortest) - space
            self.documents_consumed += 1
        return row


class PackedTokenLoader:
    """Endless iterator of (inputs, targets) int64 (B, T) batches on `device`; see the module docstring.

    Use as a context manager or call `close()` to stop the background thread. Resume with
    `PackedTokenLoader(..., state=previous.state_dict())` (or `load_state_dict` before the first batch).
    The state is per rank: save each rank's own.
    """

    def __init__(self, shards: Sequence[Path | str], tokenizer: DocumentTokenizer, batch_size: int,
                 seq_len: int, *, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 tokenizer_threads: int = 4, tokenizer_batch_size: int = 128, buffer_size: int = 1000,
                 prefetch_batches: int = 4, state: dict[str, Any] | None = None):
        if not shards:
            raise ValueError("PackedTokenLoader needs at least one shard")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if min(tokenizer_batch_size, buffer_size, prefetch_batches) < 1 or tokenizer_threads < 0:
            raise ValueError("tokenizer_batch_size, buffer_size and prefetch_batches must be positive and "
                             "tokenizer_threads non-negative")
        self.shards = [Path(p) for p in shards]
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.tokenizer_threads = tokenizer_threads
        self.tokenizer_batch_size = tokenizer_batch_size
        self.buffer_size = buffer_size
        self._fingerprint = shard_fingerprint(self.shards)
        self._pin = self.device.type == "cuda"
        self._state = self._make_state(Cursor(), [], dict.fromkeys(COUNTERS, 0))
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_batches)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None
        if state is not None:
            self.load_state_dict(state)

    def _make_state(self, cursor: Cursor, buffered: list[DocId], counters: dict[str, int]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size,
            "num_shards": len(self.shards), "shards_sha256": self._fingerprint,
            "cursor": dataclasses.asdict(cursor), "buffer": [list(doc) for doc in buffered], **counters,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next batch, consistent with the batches received so far."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict must come before the first batch is taken")
        self._state = self._validated(state)

    def _validated(self, state: dict[str, Any]) -> dict[str, Any]:
        try:
            if state["format"] != STATE_FORMAT:
                raise ValueError(f"loader state format {state['format']!r}; this code reads {STATE_FORMAT}")
            if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
                raise ValueError(f"loader state belongs to rank {state['rank']} of {state['world_size']}, "
                                 f"not rank {self.rank} of {self.world_size}; resume with the same world size")
            if (state["num_shards"], state["shards_sha256"]) != (len(self.shards), self._fingerprint):
                raise ValueError(f"loader state was taken over a different shard list ({state['num_shards']} "
                                 f"shards) than this loader's ({len(self.shards)} shards, {self.shards[0].name} "
                                 f"... {self.shards[-1].name}); resume with the same data")
            cursor = Cursor(**{k: int(v) for k, v in state["cursor"].items()})
            buffered = [DocId(*(int(x) for x in doc)) for doc in state["buffer"]]
            counters = {name: int(state[name]) for name in COUNTERS}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed loader state ({type(exc).__name__}: {exc})") from exc
        if min(dataclasses.astuple(cursor)) < 0 or cursor.shard >= len(self.shards):
            raise ValueError(f"loader state cursor {cursor} is outside the {len(self.shards)} shards")
        if any(not 0 <= doc.shard < len(self.shards) for doc in buffered):
            raise ValueError(f"loader state buffer names a shard outside the {len(self.shards)} shards")
        return self._make_state(cursor, buffered, counters)

    @property
    def epoch(self) -> int:
        return self._state["cursor"]["epoch"]

    @property
    def batches_yielded(self) -> int:
        return self._state["batches_yielded"]

    @property
    def documents_consumed(self) -> int:
        return self._state["documents_consumed"]

    @property
    def tokens_cropped(self) -> int:
        return self._state["tokens_cropped"]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id, num_threads=self.tokenizer_threads)

    def _tokenized(self, documents: Iterator[tuple[DocId, str, Cursor]]) -> Iterator[tuple[DocId, list[int], Cursor]]:
        while True:
            chunk = list(itertools.islice(documents, self.tokenizer_batch_size))
            for (doc, _, after), tokens in zip(chunk, self._encode([text for _, text, _ in chunk]), strict=True):
                yield doc, tokens, after

    def _restored_packer(self) -> BestFitPacker:
        state = self._state
        cursor = Cursor(**state["cursor"])
        stream = self._tokenized(iter_documents(self.shards, self.rank, self.world_size, cursor))
        packer = BestFitPacker(stream, self.seq_len + 1, self.buffer_size, cursor)
        packer.documents_consumed = state["documents_consumed"]
        packer.tokens_cropped = state["tokens_cropped"]
        buffered = [DocId(*doc) for doc in state["buffer"]]
        texts = read_documents(self.shards, buffered)
        for start in range(0, len(texts), self.tokenizer_batch_size):
            chunk = slice(start, start + self.tokenizer_batch_size)
            for doc, tokens in zip(buffered[chunk], self._encode(texts[chunk]), strict=True):
                packer.add(doc, tokens)
        return packer

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            packer = self._restored_packer()
            batches = self._state["batches_yielded"]
            while not self._stop.is_set():
                rows = torch.tensor([packer.next_row() for _ in range(self.batch_size)], dtype=torch.long)
                inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
                if self._pin:
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                batches += 1
                counters = {"batches_yielded": batches, "documents_consumed": packer.documents_consumed,
                            "tokens_cropped": packer.tokens_cropped}
                if not self._put((inputs, targets, self._make_state(packer.cursor, packer.buffered(), counters))):
                    return
        except Exception as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def __iter__(self) -> PackedTokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._failure is not None:
            raise self._failure
        if self._stop.is_set():
            raise RuntimeError("PackedTokenLoader is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="PackedTokenLoader", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, Exception):
            self._failure = item
            raise item
        inputs, targets, self._state = item
        return (inputs.to(self.device, non_blocking=self._pin), targets.to(self.device, non_blocking=self._pin))

    def close(self) -> None:
        """Stop the background thread and drop read-ahead batches; the loader cannot be iterated again."""
        self._stop.set()
        self._drain()  # wakes a thread waiting to put, which then sees the stop
        if self._thread is not None:
            self._thread.join()
        self._drain()

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> PackedTokenLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
