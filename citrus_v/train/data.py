"""Training data for ``citrus-v sft``: datasets from ``--dataset`` and the batch collator."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..processing.processor import CitrusVProcessor


class DatasetError(ValueError):
    """A ``--dataset`` entry that cannot be read."""


def dataset_files(entries: list[str]) -> list[tuple[Path, int | None]]:
    """``FILE``, ``FILE#N`` (sample N rows) or a folder of ``*.jsonl`` shards -> (file, N)."""
    files: list[tuple[Path, int | None]] = []
    for entry in entries:
        path_text, _, count = entry.partition("#")
        path = Path(path_text)
        limit = int(count) if count else None
        if path.is_dir():
            shards = sorted(path.glob("*.jsonl"))
            if not shards:
                raise DatasetError(f"--dataset {entry}: the folder holds no *.jsonl shards")
            files += [(shard, None) for shard in shards]
        elif path.is_file():
            files.append((path, limit))
        else:
            raise DatasetError(f"--dataset {entry}: no such file or folder")
    return files


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and not value.startswith(("data:", "http://", "https://")):
        path = Path(value)
        return str(path if path.is_absolute() else base / path)
    return value


class JsonlSftDataset(Dataset):
    """Rows of ms-swift JSONL files, as processor samples with an ``id`` of ``file:line``."""

    def __init__(self, entries: list[str], seed: int = 42, strict: bool = False) -> None:
        self.rows: list[dict] = []
        self.skipped: Counter[str] = Counter()
        rng = random.Random(seed)
        for path, limit in dataset_files(entries):
            rows = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                        raise ValueError("a row needs a 'messages' list")
                except ValueError as err:
                    if strict:
                        raise DatasetError(f"{where}: {err}") from err
                    self.skipped[f"invalid row ({err.__class__.__name__})"] += 1
                    continue
                sample = {
                    "id": row.get("id", where),
                    "messages": row["messages"],
                    "images": [_resolve(i, path.parent) for i in row.get("images") or []],
                    "masks": [_resolve(m, path.parent) for m in row.get("masks") or []],
                }
                if row.get("system"):
                    sample["system"] = row["system"]
                rows.append(sample)
            if limit is not None:
                rows = rng.sample(rows, min(limit, len(rows))) if limit < len(rows) else rows
            self.rows += rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class SftCollator:
    """Encodes a list of samples into one CitrusV batch; keeps the sample ids for error messages."""

    def __init__(self, processor: CitrusVProcessor, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        batch = self.processor(samples)
        if batch["input_ids"].shape[1] > self.max_length:
            lengths = batch["attention_mask"].sum(1).tolist()
            longest = max(range(len(samples)), key=lambda i: lengths[i])
            raise DatasetError(
                f"sample {samples[longest].get('id')} has {lengths[longest]} tokens, over --max_length "
                f"{self.max_length}; raise --max_length or lower MAX_PIXELS"
            )
        batch["sample_ids"] = [s.get("id") for s in samples]
        return batch


def build_train_dataset(args, processor: CitrusVProcessor) -> tuple[Dataset, SftCollator, str]:
    """The training dataset, its collator, and a one-line summary of what was read and skipped."""
    dataset = JsonlSftDataset(list(args.dataset), seed=args.seed, strict=args.strict)
    if len(dataset) == 0:
        raise DatasetError(f"--dataset {' '.join(args.dataset)}: no usable rows")
    skipped = ", ".join(f"{n} {reason}" for reason, n in dataset.skipped.items()) or "none"
    summary = f"dataset: {len(dataset)} rows; skipped: {skipped}"
    return dataset, SftCollator(processor, args.max_length), summary
