"""Streaming over JSONL shards: an iterable dataset for data that does not fit a map-style index.

Rows are numbered in one global order per epoch (shards in a seeded order, lines in file order; every
non-blank line counts, bad ones included, so that nothing is silently lost). Consumer
``c = rank × num_workers + worker`` takes the rows with ``number % consumers == c``: across DDP ranks and
loader workers every row is read exactly once per epoch, with no gaps. Each consumer shuffles through its
own buffer, seeded by ``(seed, epoch, c)``.

Resuming: every item carries ``item["stream"] = (consumer, consumers, k)`` (its consumer and how many
items that consumer has produced). The training loop passes the trained batch's ``stream_positions`` to
:meth:`StreamingJsonlDataset.advance`; :meth:`state_dict` (saved with a checkpoint) records the epoch
and each consumer's count, and after :meth:`load_state_dict` each consumer replays its stream and skips
what was already trained on — exact, without decoding the skipped rows' images. The world size and
number of workers must be the same when resuming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import SkippedRow, load_item
from .rows import RowIssue, RowProblem, RowRecord, check_schema, read_jsonl
from .validate import ValidationOptions


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingJsonlDataset(IterableDataset):
    """Iterate JSONL shards once per epoch across ranks and workers (see the module docstring).

    Args:
        shards: JSONL files (paths inside rows are relative to each file's folder).
        options: how images are loaded (bounds for boxes, pixel limit); default upstream bounds.
        shuffle_buffer: rows held for shuffling per consumer (0 keeps file order).
        seed: shuffling seed; the epoch is mixed in (:meth:`set_epoch`).
        rank, world_size: default from ``torch.distributed`` when initialised, else 0 and 1.
        transform: turns a :class:`RowRecord` into an item; default :func:`load_item` (a processor-ready
            sample, or :class:`SkippedRow`). ``None`` yields the records themselves.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        options: ValidationOptions | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[RowRecord, ValidationOptions], Any] | None = load_item,
    ) -> None:
        super().__init__()
        self.shards = [Path(s) for s in shards]
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) not found: {', '.join(missing)}")
        self.options = options or ValidationOptions(decode=False)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        default_rank, default_world = _distributed()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.transform = transform
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # consumer -> items trained on this epoch
        self.consumers: int | None = None

    # --- position ------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a new shuffle; positions reset)."""
        self.epoch = int(epoch)
        self.consumed = {}

    def advance(self, positions: Sequence[tuple[int, int, int]]) -> None:
        """Record items as trained on (``batch.stream_positions``)."""
        for consumer, consumers, count in positions:
            if self.consumers is not None and consumers != self.consumers:
                raise ValueError(f"positions from {consumers} consumers, expected {self.consumers}")
            self.consumers = int(consumers)
            self.consumed[int(consumer)] = max(self.consumed.get(int(consumer), 0), int(count))

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: epoch, seed, world size, consumers and per-consumer counts."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "consumers": self.consumers,
            "consumed": {str(k): v for k, v in sorted(self.consumed.items())},
            "shards": [str(s) for s in self.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same shards, seed and world size required)."""
        if int(state["world_size"]) != self.world_size or int(state["seed"]) != self.seed:
            raise ValueError(
                f"cannot resume: saved world_size={state['world_size']}, seed={state['seed']}; now "
                f"world_size={self.world_size}, seed={self.seed}"
            )
        if [str(s) for s in self.shards] != list(state["shards"]):
            raise ValueError("cannot resume: the shard list differs from the saved one")
        self.epoch = int(state["epoch"])
        self.consumers = state.get("consumers")
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}

    # --- iteration -----------------------------------------------------------------------------------------
    def _rows(self) -> Iterator[RowRecord | RowIssue]:
        # read_jsonl reads bytes: a line that is not UTF-8 (or not JSON) is one counted bad row, not a crash
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.shards))
        for index in order:
            yield from read_jsonl(self.shards[int(index)])

    def _mine(self, consumer: int, consumers: int) -> Iterator[RowRecord | SkippedRow]:
        for global_index, item in enumerate(self._rows()):
            if global_index % consumers != consumer:
                continue
            if isinstance(item, RowIssue):
                yield SkippedRow(item)
                continue
            try:
                check_schema(item.row)
            except RowProblem as problem:
                yield SkippedRow(RowIssue(str(item.file), item.line, problem.reason, str(problem)))
                continue
            yield item

    def _shuffled(self, stream: Iterator[Any], consumer: int) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        rng = np.random.default_rng([self.seed, self.epoch, consumer + 1])
        buffer: list[Any] = []
        for item in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], item = item, buffer[pick]
            yield item
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumers = self.world_size * workers
        consumer = self.rank * workers + worker
        if self.consumers is not None and self.consumed and self.consumers != consumers:
            raise ValueError(
                f"cannot resume: the position was saved with {self.consumers} consumers (ranks × workers), now "
                f"{consumers}; use the same world size and number of loader workers"
            )
        skip = self.consumed.get(consumer, 0)
        for count, item in enumerate(self._shuffled(self._mine(consumer, consumers), consumer), start=1):
            if count <= skip:
                continue  # already trained on before the checkpoint
            if isinstance(item, RowRecord) and self.transform is not None:
                item = self.transform(item, self.options)
            if isinstance(item, SkippedRow):
                yield {"skipped": item, "stream": (consumer, consumers, count)}
            elif isinstance(item, dict):
                yield {**item, "stream": (consumer, consumers, count)}
            else:
                yield {"record": item, "stream": (consumer, consumers, count)}
