"""Conversation batches for post-training: padded rows for SFT, best-fit packed rows for midtraining.

A conversation is rendered by the tokenizer into ids and a mask that is 1 on the tokens the assistant
writes. Batches are (inputs, targets) int64 tensors where targets[t] is the next token when the assistant
writes it and -1 (ignored by the loss) everywhere else, padding included.

Data order: rank r of W takes the examples r, r + W, r + 2W, ... of the dataset (a `TaskMixture`), starting
over with the next epoch at its end, so ranks see disjoint examples. Each loader's `state_dict()` says where
the next batch comes from (epoch, position, and for packing the buffered examples); a loader built with that
state yields exactly the batches the original would have yielded next.

- `PaddedChatLoader` (SFT): one conversation per row, rows padded to the longest in the batch. A conversation
  that fits in `max_seq_len` + 1 tokens is never cut; a longer one is cut to that and counted in `truncated`.
- `PackedChatLoader` (midtraining): rows of exactly `max_seq_len` + 1 tokens, each starting with a
  conversation's BOS, filled by taking the longest buffered conversation that still fits; when none fits the
  rest of the row is padding (ignored). A conversation longer than a row is cut to one row and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from nanochat.configargs import UsageError

IGNORE_INDEX = -1
STATE_FORMAT = 1


class Examples(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class ChatTokenizer(Protocol):
    bos_id: int

    def render_conversation(self, conversation: Mapping[str, Any], max_tokens: int) -> tuple[list[int], list[int]]: ...


def render(tokenizer: ChatTokenizer, conversation: Mapping[str, Any], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """(ids, mask, truncated): the rendered conversation cut to `max_tokens`, and whether anything was cut."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens + 1)
    truncated = len(ids) > max_tokens
    return ids[:max_tokens], mask[:max_tokens], truncated


def shifted_targets(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """targets[t] = ids[t + 1] where the assistant writes that token, else -1; one shorter than ids."""
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]


def padded_batch(rendered: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to the longest (ids, mask) pair: int64 inputs and targets of shape (B, longest - 1)."""
    width = max(len(ids) for ids, _ in rendered) - 1
    if width < 1:
        raise ValueError("every conversation in the batch is a single token; nothing to predict")
    inputs = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rendered), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        length = len(ids) - 1
        if length > 0:
            inputs[row, :length] = torch.tensor(ids[:-1], dtype=torch.long)
            targets[row, :length] = torch.tensor(shifted_targets(ids, mask), dtype=torch.long)
    return inputs, targets


class ExampleStream:
    """This rank's share of the dataset in order, epoch after epoch: indices rank, rank + W, rank + 2W, ..."""

    def __init__(self, dataset: Examples, rank: int = 0, world_size: int = 1, epoch: int = 0, position: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if rank >= len(dataset):
            raise UsageError(f"rank {rank} of {world_size} gets no examples from a dataset of {len(dataset)}; "
                             "use more data or fewer processes")
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.position = position

    def next_index(self) -> int:
        index = self.rank + self.position * self.world_size
        if index >= len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
            index = self.rank
        self.position += 1
        return index


class _ChatLoader:
    """What both loaders share: the stream, the device, the counters and the saved position."""

    kind = ""

    def __init__(self, dataset: Examples, tokenizer: ChatTokenizer, batch_size: int, max_seq_len: int,
                 rank: int, world_size: int, device: str | torch.device):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size} and {max_seq_len}")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.stream = ExampleStream(dataset, rank, world_size)
        self.truncated = 0
        self.examples_consumed = 0

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def _next_rendered(self) -> tuple[int, list[int], list[int]]:
        index = self.stream.next_index()
        ids, mask, truncated = render(self.tokenizer, self.dataset[index], self.max_seq_len + 1)
        self.truncated += truncated
        self.examples_consumed += 1
        return index, ids, mask

    def _base_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": self.kind, "rank": self.stream.rank,
                "world_size": self.stream.world_size, "dataset_size": len(self.dataset),
                "epoch": self.stream.epoch, "position": self.stream.position, "truncated": self.truncated,
                "examples_consumed": self.examples_consumed}

    def _restore_base(self, state: Mapping[str, Any]) -> None:
        expected = {"format": STATE_FORMAT, "kind": self.kind, "rank": self.stream.rank,
                    "world_size": self.stream.world_size, "dataset_size": len(self.dataset)}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"the saved loader position {found} does not match this run {expected}; resume "
                             "with the same data, flags and number of processes")
        self.stream.epoch, self.stream.position = int(state["epoch"]), int(state["position"])
        self.truncated = int(state["truncated"])
        self.examples_consumed = int(state["examples_consumed"])

    def __iter__(self):
        return self

    def close(self) -> None:
        """Nothing runs in the background; every batch source can be closed alike."""

    def _to_device(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs.to(self.device), targets.to(self.device)


class PaddedChatLoader(_ChatLoader):
    """Endless (inputs, targets) batches of `batch_size` conversations, padded to the longest (see above)."""

    kind = "padded"

    def __init__(self, dataset: Examples, tokenizer: ChatTokenizer, batch_size: int, max_seq_len: int, *,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 state: Mapping[str, Any] | None = None):
        super().__init__(dataset, tokenizer, batch_size, max_seq_len, rank, world_size, device)
        if state is not None:
            self._restore_base(state)

    def state_dict(self) -> dict[str, Any]:
        return self._base_state()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = [self._next_rendered()[1:] for _ in range(self.batch_size)]
        return self._to_device(*padded_batch(rendered, self.tokenizer.bos_id))


class PackedChatLoader(_ChatLoader):
    """Endless (inputs, targets) batches of shape (batch_size, max_seq_len), conversations best-fit packed."""

    kind = "packed"

    def __init__(self, dataset: Examples, tokenizer: ChatTokenizer, batch_size: int, max_seq_len: int, *,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", buffer_size: int = 100,
                 state: Mapping[str, Any] | None = None):
        super().__init__(dataset, tokenizer, batch_size, max_seq_len, rank, world_size, device)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        self.buffer_size = buffer_size
        self.padded_tokens = 0
        self._buffer: list[tuple[int, list[int], list[int]]] = []  # (index, ids, mask) in arrival order
        if state is not None:
            self._restore_base(state)
            self.padded_tokens = int(state["padded_tokens"])
            for index in state["buffer"]:
                ids, mask, _ = render(self.tokenizer, self.dataset[int(index)], self.max_seq_len + 1)
                self._buffer.append((int(index), ids, mask))

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "padded_tokens": self.padded_tokens,
                "buffer": [index for index, _, _ in self._buffer]}

    def _best_fit(self, space: int) -> int | None:
        """Buffer position of the longest conversation of at most `space` tokens (the earliest on ties)."""
        best = None
        for position, (_, ids, _) in enumerate(self._buffer):
            if len(ids) <= space and (best is None or len(ids) > len(self._buffer[best][1])):
                best = position
        return best

    def _next_row(self) -> tuple[list[int], list[int]]:
        row_len = self.max_seq_len + 1
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < row_len:
            while len(self._buffer) < self.buffer_size:
                self._buffer.append(self._next_rendered())
            space = row_len - len(ids)
            position = self._best_fit(space)
            if position is None:
                self.padded_tokens += space
                ids += [self.tokenizer.bos_id] * space
                mask += [0] * space
                break
            _, conversation_ids, conversation_mask = self._buffer.pop(position)
            ids += conversation_ids
            mask += conversation_mask
        return ids, mask

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.batch_size)]
        inputs = torch.tensor([ids[:-1] for ids, _ in rows], dtype=torch.long)
        targets = torch.tensor([shifted_targets(ids, mask) for ids, mask in rows], dtype=torch.long)
        return self._to_device(inputs, targets)


class MixedBatches:
    """SFT batches whose last rows are pretraining text: `chat` gives the padded conversation rows, `pretrain`
    (a `PackedTokenLoader` of the same sequence length) the text rows, cut to the conversations' width.
    Text rows train on every token; they keep the facts learned in pretraining from being forgotten."""

    def __init__(self, chat: PaddedChatLoader, pretrain: Any | None):
        self.chat = chat
        self.pretrain = pretrain

    @property
    def epoch(self) -> int:
        return self.chat.epoch

    @property
    def truncated(self) -> int:
        return self.chat.truncated

    @property
    def examples_consumed(self) -> int:
        return self.chat.examples_consumed

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.chat)
        if self.pretrain is None:
            return inputs, targets
        text_inputs, text_targets = next(self.pretrain)
        width = inputs.shape[1]
        return (torch.cat([inputs, text_inputs[:, :width].to(inputs.device)]),
                torch.cat([targets, text_targets[:, :width].to(targets.device)]))

    def state_dict(self) -> dict[str, Any]:
        return {"chat": self.chat.state_dict(),
                "pretrain": self.pretrain.state_dict() if self.pretrain is not None else None}

    def close(self) -> None:
        if self.pretrain is not None:
            self.pretrain.close()


def mean_rendered_length(dataset: Examples, tokenizer: ChatTokenizer, max_seq_len: int, sample: int = 1000) -> float:
    """Mean rendered length (cut to a row) of the first `sample` examples: in a shuffled mixture, a fair
    sample, used to size "one pass" of packed training without rendering everything."""
    count = min(sample, len(dataset))
    if count == 0:
        raise ValueError("the dataset is empty")
    return sum(len(render(tokenizer, dataset[i], max_seq_len + 1)[0]) for i in range(count)) / count
