"""Streaming: every row exactly once per epoch across 2 ranks x 2 loader workers; exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from citrus_v.data.streaming import StreamingJsonlDataset


def _shards(root: Path, sizes=(23, 17, 31)) -> list[Path]:
    paths, uid = [], 0
    for k, size in enumerate(sizes):
        lines = []
        for _ in range(size):
            lines.append(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": f"row {uid}"}], "uid": uid}))
            uid += 1
        path = root / f"shard{k}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def _uid(item: dict) -> int:
    return item["record"].row["uid"]


def _loader(dataset: StreamingJsonlDataset, workers: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=list)


def test_every_row_exactly_once_across_ranks_and_workers(tmp_path):
    shards = _shards(tmp_path)
    for epoch in (0, 1):
        seen: Counter[int] = Counter()
        orders = []
        for rank in range(2):
            dataset = StreamingJsonlDataset(shards, shuffle_buffer=8, seed=1, rank=rank, world_size=2, transform=None)
            dataset.set_epoch(epoch)
            items = [item for batch in _loader(dataset) for item in batch]
            order = [_uid(item) for item in items]
            # two loader worker processes per rank: consumers rank*2 and rank*2+1 of 4
            assert {item["stream"][:2] for item in items} == {(2 * rank, 4), (2 * rank + 1, 4)}
            seen.update(order)
            orders.append(order)
        assert sorted(seen) == list(range(71)) and set(seen.values()) == {1}, epoch
        assert abs(len(orders[0]) - len(orders[1])) <= 1
        if epoch == 0:
            first = orders
    assert first != orders  # a new epoch shuffles differently
    assert orders[0] != sorted(orders[0])  # the buffer shuffles


def test_resume_continues_exactly_where_training_stopped(tmp_path):
    shards = _shards(tmp_path)
    full = []
    dataset = StreamingJsonlDataset(shards, shuffle_buffer=8, seed=2, rank=1, world_size=2, transform=None)
    for batch in _loader(dataset):
        full += [_uid(item) for item in batch]
    # train on 3 batches, save the position, resume in a fresh dataset and loader
    dataset = StreamingJsonlDataset(shards, shuffle_buffer=8, seed=2, rank=1, world_size=2, transform=None)
    trained = []
    for step, batch in enumerate(_loader(dataset)):
        trained += [_uid(item) for item in batch]
        dataset.advance([item["stream"] for item in batch])
        if step == 2:
            break
    state = json.loads(json.dumps(dataset.state_dict()))  # what a checkpoint stores
    resumed = StreamingJsonlDataset(shards, shuffle_buffer=8, seed=2, rank=1, world_size=2, transform=None)
    resumed.load_state_dict(state)
    rest = [_uid(item) for batch in _loader(resumed) for item in batch]
    assert sorted(trained + rest) == sorted(full) and not set(trained) & set(rest)
    # a different number of loader workers cannot resume exactly: it is refused
    with pytest.raises(ValueError, match="same world size and number of loader workers"):
        list(_loader(resumed, workers=0))
    with pytest.raises(ValueError, match="cannot resume: saved world_size=2"):
        StreamingJsonlDataset(shards, seed=2, rank=0, world_size=1, transform=None).load_state_dict(state)


def test_bad_lines_are_counted_not_lost(tmp_path, tiny):
    from citrus_v.data.collator import CitrusVCollator

    _, processor = tiny
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(good), "{broken", json.dumps({"messages": "x"}), json.dumps(good)]
    # a Latin-1 line (not UTF-8) is one bad row, not the end of the shard
    path.write_bytes("\n".join(lines).encode() + b'\n{"messages": "caf\xe9"}\n' + json.dumps(good).encode() + b"\n")
    dataset = StreamingJsonlDataset([path], shuffle_buffer=0)
    collator = CitrusVCollator(processor)
    batch = collator(list(dataset))
    assert batch.num_samples == 3 and len(batch.stream_positions) == 6
    assert collator.skips.counts == {"invalid_json": 1, "schema": 1, "invalid_encoding": 1}
    assert {(i.line, i.reason) for i in batch.skipped} == {(2, "invalid_json"), (3, "schema"), (5, "invalid_encoding")}
    assert all(i.file == str(path) for i in batch.skipped)

