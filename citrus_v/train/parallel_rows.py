"""``--dataset_num_proc``: check and measure a dataset's rows in several processes, with one process's result.

Before training every row is checked (schema, image and mask headers, boxes) and its tokens are counted after
the chat template, so that rows over ``--max_length`` are dropped up front. With ``N`` processes the rows are
handed out in chunks and the answers read back in file order, so the kept rows, their lengths and the skipped
rows (counted by reason, with ``file:line``, and ``--strict`` stopping at the first) are those of one process.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from pathlib import Path

from ..data.dataset import RowDataset, measure_record
from ..data.rows import RowIssue, RowProblem, RowRecord, SkipCounter, check_schema, read_jsonl
from ..data.validate import ValidationOptions
from ..processing.processor import CitrusVProcessor
from ..processing.template import ChatTemplate

# chunks per process: small enough to keep every process busy to the end, large enough to cost little
CHUNKS_PER_PROCESS = 8

# set once in each worker process by its pool's initializer (the pool's own processes, never the caller's)
_worker_state: tuple[ChatTemplate, ValidationOptions, int | None] | None = None


def _start_worker(template: ChatTemplate, options: ValidationOptions, max_length: int | None) -> None:
    global _worker_state
    _worker_state = (template, options, max_length)


def _measure(
    record: RowRecord, template: ChatTemplate, options: ValidationOptions, max_length: int | None
) -> int | RowIssue:
    """The schema check :func:`~citrus_v.data.rows.iter_rows` makes in one process, then the same measure."""
    try:
        check_schema(record.row)
    except RowProblem as problem:
        return RowIssue(str(record.file), record.line, problem.reason, str(problem))
    return measure_record(record, options, template, max_length)


def _measure_in_worker(record: RowRecord) -> int | RowIssue:
    assert _worker_state is not None, "the pool's initializer sets the worker state"
    return _measure(record, *_worker_state)


def measure_rows(
    paths: Sequence[str | Path],
    processor: CitrusVProcessor,
    options: ValidationOptions,
    max_length: int | None,
    strict: bool,
    num_proc: int,
) -> RowDataset:
    """:meth:`RowDataset.from_jsonl` for ``paths``, with the rows checked and measured in ``num_proc``
    processes."""
    if num_proc <= 1:
        return RowDataset.from_jsonl(paths, processor, options=options, max_length=max_length, strict=strict)
    options = ValidationOptions(**{**options.__dict__, "decode": False})  # headers only, as from_jsonl reads
    items = [item for path in paths for item in read_jsonl(path)]
    records = [item for item in items if isinstance(item, RowRecord)]
    chunk = max(1, len(records) // (num_proc * CHUNKS_PER_PROCESS))
    skips = SkipCounter(strict=strict)
    kept: list[RowRecord] = []
    lengths: list[int] = []
    initargs = (processor.template, options, max_length)
    with multiprocessing.get_context().Pool(num_proc, initializer=_start_worker, initargs=initargs) as pool:
        answers = pool.imap(_measure_in_worker, records, chunksize=chunk)
        for item in items:  # in file order: JSON errors where they stand, each row's answer in its place
            outcome = item if isinstance(item, RowIssue) else next(answers)
            if isinstance(outcome, RowIssue):
                skips.record(outcome)
            else:
                kept.append(item)
                lengths.append(outcome)
    return RowDataset(kept, options, lengths, skips)
