"""PackedTokenLoader: row shape and BOS alignment, best-fit packing, rank sharding, exact resume, failures."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.configargs import UsageError
from nanochat.dataloader import Cursor, DocId, PackedTokenLoader, iter_documents, split_shards
from nanochat.tokenizer import iter_parquet_texts

BOS = 0
TAG = re.compile(r"<(\d+),(\d+),(\d+)>")


class ByteTokenizer:
    """Token = UTF-8 byte + 1, BOS = 0."""

    bos_id = BOS

    def encode(self, texts, prepend=None, num_threads=0):
        head = [] if prepend is None else [prepend]
        return [head + [b + 1 for b in text.encode()] for text in texts]


class FailingTokenizer(ByteTokenizer):
    def encode(self, texts, prepend=None, num_threads=0):
        raise RuntimeError("tokenizer exploded")


def decode(row) -> str:
    """A row as text, with '|' for each BOS."""
    return "".join("|" if t == BOS else chr(t - 1) for t in row.tolist())


def write_shard(path: Path, texts: list[str], row_group_size: int) -> Path:
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)
    return path


# Fixture layout: shard s has ROW_GROUPS[s] row groups of DOCS_PER_GROUP documents; each document starts with
# its tag <shard,row_group,row> and has a random length up to three times SEQ_LEN.
SEQ_LEN = 16
ROW_GROUPS = (3, 2, 3)
DOCS_PER_GROUP = 5


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    rng = random.Random(1234)
    paths = []
    for s, groups in enumerate(ROW_GROUPS):
        texts = [f"<{s},{g},{r}>" + "".join(rng.choices("abcdefgh", k=rng.randint(0, 3 * SEQ_LEN)))
                 for g in range(groups) for r in range(DOCS_PER_GROUP)]
        paths.append(write_shard(tmp_path / f"shard_{s:05d}.parquet", texts, DOCS_PER_GROUP))
    return paths


def global_row_group(shard: int, row_group: int) -> int:
    return sum(ROW_GROUPS[:shard]) + row_group


def make_loader(shards, **overrides) -> PackedTokenLoader:
    options = {"batch_size": 2, "seq_len": SEQ_LEN, "buffer_size": 4, "tokenizer_batch_size": 3,
               "prefetch_batches": 3}
    options.update(overrides)
    return PackedTokenLoader(shards, ByteTokenizer(), **options)


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_rows_are_bos_aligned_and_shifted(shards):
    with make_loader(shards, batch_size=3) as loader:
        for inputs, targets in take(loader, 12):
            assert inputs.shape == targets.shape == (3, SEQ_LEN)
            assert inputs.dtype == targets.dtype == torch.int64
            assert inputs.device.type == "cpu" and inputs.is_contiguous() and targets.is_contiguous()
            assert (inputs[:, 0] == BOS).all()
            assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_batches(shards):
    with make_loader(shards) as on_cpu, make_loader(shards, device="cuda") as on_gpu:
        for (x, y), (gx, gy) in zip(take(on_cpu, 8), take(on_gpu, 8), strict=True):
            assert gx.device.type == gy.device.type == "cuda"
            assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_best_fit_packing_by_hand(tmp_path):
    # Lengths with BOS: a5 b8 c3 d13 e2 f5 g4 h10 i17; rows hold 10 tokens; the buffer keeps 3 documents.
    texts = ["aaaa", "bbbbbbb", "cc", "dddddddddddd", "e", "ffff", "ggg", "hhhhhhhhh", "iiiiiiiiiiiiiiii"]
    shard = write_shard(tmp_path / "shard_00000.parquet", texts, 4)
    with PackedTokenLoader([shard], ByteTokenizer(), 2, 9, buffer_size=3) as loader:
        rows = [decode(row) for inputs, targets in take(loader, 2)
                for row in torch.cat([inputs, targets[:, -1:]], dim=1)]
        assert rows == [
            "|bbbbbbb|c",  # [a b c]: b is the longest that fits; then [a c d]: nothing fits 2, crop c
            "|aaaa|ffff",  # [a d e]: a; [d e f]: f fills the 5 left
            "|ggg|e|hhh",  # [d e g]: g; [d e h]: e; [d h i]: nothing fits 4, crop h (shortest)
            "|aaaa|bbbb",  # next epoch: [d i a]: a; [d i b]: crop b
        ]
        assert loader.documents_consumed == 9
        assert loader.tokens_cropped == 1 + 6 + 3
        assert loader.batches_yielded == 2
        assert loader.epoch == 1
        state = loader.state_dict()
        assert state["buffer"] == [[0, 0, 3], [0, 2, 0]]  # d and i wait, in arrival order
        assert state["cursor"] == {"epoch": 1, "shard": 0, "row_group": 0, "row": 2, "global_row_group": 0}


def test_buffer_of_one_packs_documents_in_order(tmp_path):
    texts = ["aaaa", "bbbbbbb", "cc", "dddddddddddd", "e", "ffff", "ggg"]
    shard = write_shard(tmp_path / "shard_00000.parquet", texts, 3)
    with PackedTokenLoader([shard], ByteTokenizer(), 3, 9, buffer_size=1) as loader:
        inputs, targets = next(loader)
        rows = [decode(row) for row in torch.cat([inputs, targets[:, -1:]], dim=1)]
        assert rows == ["|aaaa|bbbb", "|cc|dddddd", "|e|ffff|gg"]


def test_ties_go_to_the_earliest_document(tmp_path):
    shard = write_shard(tmp_path / "shard_00000.parquet", ["aa", "bb", "cc", "dd"], 4)
    with PackedTokenLoader([shard], ByteTokenizer(), 2, 6, buffer_size=4) as loader:
        inputs, targets = next(loader)
        rows = [decode(row) for row in torch.cat([inputs, targets[:, -1:]], dim=1)]
        # [a b c d]: a, b; nothing fits 1, crop c to its BOS. [d a b c] (second epoch): d, a; crop b.
        assert rows == ["|aa|bb|", "|dd|aa|"]


def test_ranks_read_disjoint_row_groups_that_cover_everything(shards):
    every_doc = {DocId(s, g, r) for s, groups in enumerate(ROW_GROUPS)
                 for g in range(groups) for r in range(DOCS_PER_GROUP)}
    seen = []
    for rank in range(2):
        docs = set()
        for doc, text, after in iter_documents(shards, rank, 2):
            if after.epoch > 0:
                break
            assert global_row_group(doc.shard, doc.row_group) % 2 == rank
            assert text.startswith(f"<{doc.shard},{doc.row_group},{doc.row}>")
            docs.add(doc)
        seen.append(docs)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == every_doc


def test_loader_batches_come_from_the_ranks_row_groups(shards):
    for rank in range(2):
        tags = set()
        with make_loader(shards, rank=rank, world_size=2) as loader:
            for inputs, _ in take(loader, 10):
                for row in inputs:
                    tags.update(TAG.findall(decode(row)))
        assert tags
        assert {global_row_group(int(s), int(g)) % 2 for s, g, _ in tags} == {rank}


def test_iter_documents_resumes_from_a_cursor(shards):
    stream = iter_documents(shards, 0, 1)
    first = [next(stream) for _ in range(40)]  # past the 40 documents of one epoch
    for k in (0, 4, 5, 17, 39):
        resumed = iter_documents(shards, 0, 1, first[k][2])
        assert [next(resumed)[:2] for _ in range(40 - k - 1)] == [d[:2] for d in first[k + 1:]]


def wait_until_read_ahead(loader):
    """Let the background thread (started by the first batch) fill its queue, so that a state taken from
    the read-ahead instead of the batches received would show."""
    deadline = time.monotonic() + 5
    while loader._thread is not None and not loader._queue.full() and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_yields_exactly_the_next_batches(shards, world_size):
    more = 4
    rank = world_size - 1
    with make_loader(shards, rank=rank, world_size=world_size) as loader:
        straight = take(loader, 24 + more)
    positions = set()
    for k in range(24):
        with make_loader(shards, rank=rank, world_size=world_size) as first:
            take(first, k)
            wait_until_read_ahead(first)
            state = json.loads(json.dumps(first.state_dict()))
        positions.add((state["cursor"]["epoch"], state["cursor"]["global_row_group"]))
        assert state["batches_yielded"] == k
        with make_loader(shards, rank=rank, world_size=world_size, state=state) as resumed:
            for (x, y), (want_x, want_y) in zip(take(resumed, more), straight[k:k + more], strict=True):
                assert torch.equal(x, want_x) and torch.equal(y, want_y)
            assert resumed.batches_yielded == k + more
    epochs = {epoch for epoch, _ in positions}
    assert len(epochs) >= 2, "the resume points must span an epoch boundary"
    assert len(positions) >= 2 * len(epochs), "the resume points must span row-group boundaries"


def test_load_state_dict_resumes_and_counters_continue(shards):
    with make_loader(shards) as loader:
        take(loader, 5)
        state = loader.state_dict()
        counters = (loader.documents_consumed, loader.tokens_cropped)
        want = take(loader, 3)
    with make_loader(shards) as resumed:
        resumed.load_state_dict(state)
        assert (resumed.documents_consumed, resumed.tokens_cropped) == counters
        assert all(torch.equal(a[0], b[0]) for a, b in zip(take(resumed, 3), want, strict=True))
        with pytest.raises(RuntimeError, match="before the first batch"):
            resumed.load_state_dict(state)


def test_tokens_are_accounted_for(shards):
    with make_loader(shards, tokenizer_batch_size=50) as loader:
        take(loader, 6)
        state = loader.state_dict()
    tokenizer = ByteTokenizer()
    stream = iter_documents(shards, 0, 1)
    arrived = []
    while not arrived or arrived[-1][2] != Cursor(**state["cursor"]):
        arrived.append(next(stream))
    waiting = {tuple(doc) for doc in state["buffer"]}
    consumed = [text for doc, text, _ in arrived if tuple(doc) not in waiting]
    assert len(consumed) == state["documents_consumed"]
    tokens = sum(len(t) for t in tokenizer.encode(consumed, prepend=BOS))
    assert tokens - state["tokens_cropped"] == 6 * 2 * (SEQ_LEN + 1)


def test_background_exception_reaches_the_consumer(shards):
    loader = PackedTokenLoader(shards, FailingTokenizer(), 2, SEQ_LEN)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        next(loader)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        next(loader)
    loader.close()
    assert not loader._thread.is_alive()


def test_rank_without_row_groups_is_a_usage_error(tmp_path):
    shard = write_shard(tmp_path / "shard_00000.parquet", ["one", "two", "three"], 2)
    with make_loader([shard], rank=2, world_size=3) as loader:
        with pytest.raises(UsageError, match="rank 2 of 3 gets no documents"):
            next(loader)


@pytest.mark.parametrize("damage", [lambda data: data[:len(data) // 2], lambda data: data[:4] + bytes(len(data) - 8) + data[-4:]])
def test_an_unreadable_shard_is_a_usage_error_naming_it(tmp_path, damage):
    good = write_shard(tmp_path / "shard_00000.parquet", ["one", "two", "three"], 2)
    bad = write_shard(tmp_path / "shard_00001.parquet", ["four", "five"], 2)
    bad.write_bytes(damage(bad.read_bytes()))  # cut by a full disk, or zeroed
    with make_loader([bad, good]) as loader:
        with pytest.raises(UsageError, match=f"^{bad} is not a readable parquet shard [^\\n]*delete it and fetch it"):
            next(loader)
    with pytest.raises(UsageError, match=f"{bad} is not a readable parquet shard"):
        list(iter_parquet_texts([good, bad], max_chars=10**9))


def test_close_stops_the_thread(shards):
    with make_loader(shards) as loader:
        next(loader)
        thread = loader._thread
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_bad_states_are_rejected(shards):
    with make_loader(shards) as loader:
        take(loader, 3)
        state = loader.state_dict()
    with pytest.raises(ValueError, match="different shard list"):
        make_loader(shards[:-1], state=state)
    with pytest.raises(ValueError, match="rank 0 of 1"):
        make_loader(shards, rank=1, world_size=2, state=state)
    with pytest.raises(ValueError, match="malformed"):
        make_loader(shards, state={k: v for k, v in state.items() if k != "cursor"})
    with pytest.raises(ValueError, match="outside"):
        make_loader(shards, state={**state, "cursor": {**state["cursor"], "shard": len(shards)}})
    missing_row = {**state, "buffer": [[0, 0, 999]]}
    with make_loader(shards, state=missing_row) as loader:
        with pytest.raises(ValueError, match="row 999"):
            next(loader)


def test_split_shards(tmp_path):
    with pytest.raises(UsageError, match=r"python -m scripts\.demo_data"):
        split_shards(tmp_path, "train")
    paths = [write_shard(tmp_path / f"shard_{i:05d}.parquet", ["x"], 1) for i in range(3)]
    paths[1].rename(tmp_path / ".partial.parquet")
    paths[2].rename(tmp_path / "shard_00002.parquet.tmp")
    with pytest.raises(UsageError, match=r"holds 1 parquet shard.*bash scripts/download_data\.sh"):
        split_shards(tmp_path, "val")
    paths[1] = (tmp_path / ".partial.parquet").rename(paths[1])
    paths[2] = (tmp_path / "shard_00002.parquet.tmp").rename(paths[2])
    assert split_shards(tmp_path, "train") == paths[:2]
    assert split_shards(tmp_path, "val") == paths[2:]
    with pytest.raises(ValueError, match="split"):
        split_shards(tmp_path, "test")
