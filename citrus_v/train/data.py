"""Training data for ``citrus-v sft``: ``--dataset`` entries -> a dataset and the batch collator.

Rows are read, checked and measured by :mod:`citrus_v.data` (bad rows skipped and counted by reason with
``file:line``, or ``--strict``), in ``--dataset_num_proc`` processes; ``--packing`` packs samples into
``--max_length`` rows; ``--streaming`` iterates shards without indexing them, with a resumable position.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from .. import objectives
from ..data.collator import CitrusVCollator
from ..data.dataset import RowDataset
from ..data.rows import DataError, SkipCounter
from ..data.streaming import StreamingJsonlDataset
from ..data.validate import ValidationOptions
from ..processing.processor import CitrusVProcessor
from ..tokens import IGNORE_INDEX
from .parallel_rows import measure_rows

# Keys the collator adds for bookkeeping; the trainer removes them before the model sees the batch.
BOOKKEEPING_KEYS = ("sample_ids", "skipped_rows", "stream_positions", "num_samples", "num_real_tokens")
# A packed row may hold this many samples with [SEG] (the model decodes each against its own image).
MAX_SEG_SAMPLES_PER_ROW = 64


class DatasetError(ValueError):
    """A ``--dataset`` entry that cannot be read."""


def dataset_files(entries: list[str]) -> list[tuple[Path, int | None]]:
    """``FILE``, ``FILE#N`` (sample N rows, repeating the file when N exceeds it) or a folder of ``*.jsonl``
    shards -> (file, N)."""
    files: list[tuple[Path, int | None]] = []
    for entry in entries:
        path_text, _, count = entry.partition("#")
        path = Path(path_text)
        if count and not count.isdigit():
            raise DatasetError(f"--dataset {entry}: '#{count}' must be a number of rows")
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


class TrainCollator:
    """:class:`CitrusVCollator` for the trainer: adds sample ids and skip records as batch keys, and never
    returns ``None`` (a micro-batch whose rows all failed to load becomes a zero-loss copy of the last good
    batch, so every rank still runs the same number of steps)."""

    def __init__(self, inner: CitrusVCollator) -> None:
        self.inner = inner
        self._fallback: dict[str, Any] | None = None

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        wheres = [
            item.get("where") for item in items if isinstance(item, dict) and "sample" in item
        ]
        batch = self.inner(items)
        skipped = []
        positions: list = []
        if batch is not None:
            skipped = [f"{issue.file}:{issue.line} {issue.reason}" for issue in batch.skipped]
            positions = list(batch.stream_positions)
            dropped = {f"{issue.file}:{issue.line}" for issue in batch.skipped}
            result = dict(batch)
            result["sample_ids"] = [w for w in wheres if w not in dropped]
            result["num_samples"] = batch.num_samples
            result["num_real_tokens"] = batch.stats.real_tokens if batch.stats else None
            self._fallback = result
        else:
            skipped = [f"{i.issue.file}:{i.issue.line} {i.issue.reason}" for i in items if hasattr(i, "issue")]
            positions = [tuple(i["stream"]) for i in items if isinstance(i, dict) and "stream" in i]
            if self._fallback is None:
                raise DatasetError(
                    "every row of the first batch failed to load: " + "; ".join(skipped or ["unknown rows"])
                )
            result = {k: v for k, v in self._fallback.items()}
            result["labels"] = result["labels"].clone().fill_(IGNORE_INDEX)
            # no [SEG] either, so that the blanked mask targets below fit the tokens
            seg = result["input_ids"] == self.inner.processor.seg_token_id
            result["input_ids"] = result["input_ids"].masked_fill(seg, self.inner.processor.tokenizer.pad_token_id)
            result["gt_masks"] = [m[:0] for m in result["gt_masks"]]
            if "objective_targets" in result:
                result["objective_targets"] = objectives.blank(result["objective_targets"])
            if "seg_image_index" in result:
                result["seg_image_index"] = [i[:0] for i in result["seg_image_index"]]
            for key in ("gt_video_masks", "gt_video_present", "seg_video_index"):
                if key in result:
                    result[key] = [None if value is None else value[:0] for value in result[key]]
            result["sample_ids"] = []
            result["num_samples"] = 0
            result["num_real_tokens"] = 0
        result["skipped_rows"] = skipped
        result["stream_positions"] = positions
        return result


def _sample_rows(dataset: RowDataset, limits: dict[Path, int], seed: int) -> None:
    """Keep ``N`` random rows of each ``FILE#N`` entry (deterministic for the seed).

    As in ms-swift, ``N`` larger than the file repeats it: every row ``N // len`` times, plus a random
    ``N % len`` of them, so ``FILE#N`` entries set the task mix.
    """
    if not limits:
        return
    rng = random.Random(seed)
    keep: list[int] = []
    by_file: dict[Path, list[int]] = {}
    for index, record in enumerate(dataset.records):
        by_file.setdefault(Path(record.file), []).append(index)
    for file, indices in by_file.items():
        limit = limits.get(file)
        if limit is None:
            keep += indices
        else:
            repeats, rest = divmod(limit, len(indices))
            keep += indices * repeats + sorted(rng.sample(indices, rest))
    keep.sort()
    dataset.records = [dataset.records[i] for i in keep]
    if dataset.lengths is not None:
        dataset.lengths = [dataset.lengths[i] for i in keep]


def build_train_dataset(
    args, processor: CitrusVProcessor, tokens_per_second: int | None = None
) -> tuple[Any, TrainCollator, str]:
    """The training dataset, its collator, and a summary of what was read and skipped (``tokens_per_second``:
    the model's ``vision_config.tokens_per_second``, which packing a video row needs)."""
    files = dataset_files(list(args.dataset))
    skips = SkipCounter(strict=args.strict)
    inner = CitrusVCollator(
        processor,
        packing=args.packing,
        max_length=args.max_length,
        max_seg_samples=MAX_SEG_SAMPLES_PER_ROW if args.packing else 1,
        skips=skips,
        sam_train_frames=args.sam_train_frames,
        seed=args.seed,
        tokens_per_second=tokens_per_second,
    )
    options = ValidationOptions.for_processor(processor)
    if args.streaming:
        if any(limit is not None for _, limit in files):
            raise DatasetError("--streaming reads whole shards: FILE#N sampling needs a map-style dataset")
        dataset = StreamingJsonlDataset([f for f, _ in files], options=options, seed=args.seed)
        summary = f"dataset: streaming {len(files)} shard(s); bad rows are skipped and counted as they come"
        if args.dataset_num_proc > 1:
            summary += (
                f"\n--dataset_num_proc {args.dataset_num_proc}: a stream is checked as it is read, in the loader; "
                "use --dataloader_num_workers to spread that work"
            )
        return dataset, TrainCollator(inner), summary
    num_proc = args.dataset_num_proc
    try:
        dataset = measure_rows(
            [f for f, _ in files], processor, options, max_length=args.max_length, strict=args.strict,
            num_proc=num_proc,
        )
    except DataError as err:
        raise DatasetError(str(err)) from err
    _sample_rows(dataset, {f: n for f, n in files if n is not None}, args.seed)
    if len(dataset) == 0:
        reasons = dataset.skips.summary()
        raise DatasetError(f"--dataset {' '.join(args.dataset)}: no usable rows ({reasons})")
    checked = f" (checked in {num_proc} processes)" if num_proc > 1 else ""
    summary = f"dataset: {len(dataset)} rows{checked}; {dataset.skips.summary()}"
    if dataset.skips.total:
        first = dataset.skips.issues[:5]
        summary += "".join(f"\n  {issue.file}:{issue.line}: {issue.reason}" for issue in first)
    return dataset, TrainCollator(inner), summary


def skipped_summary(rows: list[str]) -> str:
    """``skipped N row(s) while training: reason A n, ...`` from the trainer's skip records."""
    if not rows:
        return "skipped 0 rows while training"
    counts = Counter(row.rsplit(" ", 1)[-1] for row in rows)
    return f"skipped {len(rows)} row(s) while training: " + ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
