"""Map-style dataset over validated rows, yielding processor-ready samples.

``RowDataset.from_jsonl(paths, processor)`` reads and checks every row once (bad rows are skipped and
counted by reason, with ``file:line``), drops rows longer than ``max_length`` (counted as ``too_long``),
and keeps the token length of each row for packing or length-grouped sampling. ``dataset[i]`` loads the
row's images and masks through :mod:`citrus_v.media` (paths relative to the JSONL file's folder)
and fills ``<ref-object>``/``<bbox>`` placeholders in the model's box coordinates. A row's videos, and the 3-D
masks of a row with a video and no image, stay references (resolved against the JSONL file's folder): the
processor decodes only the frames the language model and SAM 2 see. A row that fails to
load at that point comes back as a :class:`SkippedRow`, which the collator counts and drops.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..media import MedicalImageError, read_image, read_mask
from ..objectives import annotations
from ..objectives.annotations import AnnotationError
from .rows import RowIssue, RowProblem, RowRecord, SkipCounter, iter_rows, render_objects
from .validate import ValidationOptions, inspect_row, internal_issue, media_problem


@dataclass
class SkippedRow:
    """A row that could not be loaded; the collator records it and leaves it out of the batch."""

    issue: RowIssue


def resolve_reference(ref: Any, base: str | os.PathLike) -> Any:
    """A media reference with a relative path made relative to ``base`` (a path string keeps its ``#options``;
    a dict its keys); absolute and ``~`` paths stay as they are."""
    if isinstance(ref, Mapping):
        path = str(ref.get("path", ""))
        return {**ref, "path": path if _is_anchored(path) else os.path.join(base, path)}
    text = os.fspath(ref)
    return text if _is_anchored(text) else os.path.join(base, text)


def _is_anchored(path: str) -> bool:
    return not path or path.startswith("~") or os.path.isabs(path)


def load_sample(record: RowRecord, options: ValidationOptions) -> dict[str, Any]:
    """A row as a processor-ready sample: ``messages`` (objects rendered), PIL ``images``, boolean ``masks`` (a
    video row's 3-D masks as resolved references), ``videos`` as resolved references.

    Raises :class:`RowProblem` naming what failed.
    """
    row, base = record.row, record.base_dir
    videos = [resolve_reference(ref, base) for ref in row.get("videos") or []]
    if videos and not row.get("images"):  # the masks are label volumes of the first video
        sample = {"messages": render_objects(row, None), "images": [], "videos": videos,
                  "masks": [resolve_reference(ref, base) for ref in row.get("masks") or []]}  # fmt: skip
        if row.get("system") is not None:
            sample["system"] = row["system"]
        return sample
    images = []
    for k, ref in enumerate(row.get("images") or []):
        try:
            images.append(read_image(ref, base, max_pixels=options.max_image_pixels))
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(f"images[{k}]", err) from err
    masks = []
    for k, ref in enumerate(row.get("masks") or []):
        try:
            mask = read_mask(
                ref, base, size=images[0].size if images else None, max_pixels=options.max_image_pixels
            )
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(f"masks[{k}]", err) from err
        if images and mask.shape != (images[0].height, images[0].width):
            raise RowProblem(
                "mask_size", f"masks[{k}] is {mask.shape[1]}x{mask.shape[0]} but images[0] is "
                f"{images[0].width}x{images[0].height}"
            )
        masks.append(mask)
    scaler = options.scaler(*images[0].size) if images else None
    sample: dict[str, Any] = {"messages": render_objects(row, scaler), "images": images, "masks": masks}
    if images:
        try:
            sample.update(annotations.load(row, base, images[0].size))
        except AnnotationError as err:
            raise RowProblem(err.reason, str(err)) from err
    if videos:
        sample["videos"] = videos
    if row.get("system") is not None:
        sample["system"] = row["system"]
    return sample


def load_item(record: RowRecord, options: ValidationOptions) -> dict[str, Any] | SkippedRow:
    """``{"sample": ..., "where": "file:line"}`` for the collator, or a :class:`SkippedRow` (an unexpected
    exception included: one row never stops the run)."""
    try:
        return {"sample": load_sample(record, options), "where": record.where}
    except RowProblem as problem:
        return SkippedRow(RowIssue(str(record.file), record.line, problem.reason, str(problem)))
    except Exception as err:
        return SkippedRow(internal_issue(record, err))


def measure_record(
    record: RowRecord, options: ValidationOptions, template=None, max_length: int | None = None
) -> int | RowIssue | None:
    """The row's token length under ``template`` (None without one), or the issue that drops it: a problem
    with its images, masks or boxes, an unexpected exception (``internal``), or more than ``max_length`` tokens
    (dropped, never cut)."""
    from .stats import token_length

    try:
        info = inspect_row(record, options)
        if template is None:
            return None
        length = token_length(record, info, template, options)
    except RowProblem as problem:
        return RowIssue(str(record.file), record.line, problem.reason, str(problem))
    except Exception as err:  # one row never stops the run: counted with its file:line
        return internal_issue(record, err)
    if max_length is not None and length > max_length:
        return RowIssue(
            str(record.file), record.line, "too_long", f"{length} tokens > max_length {max_length}; dropped, never cut"
        )
    return length


class RowDataset(Dataset):
    """Validated rows; ``dataset[i]`` is a processor-ready item (see the module docstring)."""

    def __init__(
        self,
        records: Sequence[RowRecord],
        options: ValidationOptions,
        lengths: Sequence[int] | None = None,
        skips: SkipCounter | None = None,
    ) -> None:
        self.records = list(records)
        self.options = options
        self.lengths = list(lengths) if lengths is not None else None
        self.skips = skips if skips is not None else SkipCounter()
        self.epoch = 0  # set by the trainer's loader each epoch: a video row's SAM 2 frames change with it

    @classmethod
    def from_jsonl(
        cls,
        paths: Sequence[str | Path],
        processor=None,
        options: ValidationOptions | None = None,
        max_length: int | None = None,
        decode: bool = False,
        strict: bool = False,
    ) -> RowDataset:
        """Read, check and (with ``processor``) measure every row of ``paths``.

        Args:
            processor: gives the image bounds (boxes, image tokens) and the template for token lengths.
            options: validation options; default from ``processor`` (or upstream bounds).
            max_length: rows with more tokens are dropped and counted (``too_long``); needs ``processor``.
            decode: decode every image now (finds truncated files up front; slower).
            strict: raise :class:`~citrus_v.data.rows.DataError` at the first bad row.
        """
        if options is None:
            options = ValidationOptions.for_processor(processor) if processor is not None else ValidationOptions()
        options = ValidationOptions(**{**options.__dict__, "decode": decode})
        if max_length is not None and processor is None:
            raise ValueError("max_length needs a processor to count tokens")
        skips = SkipCounter(strict=strict)
        records, lengths = [], []
        template = processor.template if processor is not None else None
        for record in iter_rows(paths, skips):
            outcome = measure_record(record, options, template, max_length)
            if isinstance(outcome, RowIssue):
                skips.record(outcome)
                continue
            if outcome is not None:
                lengths.append(outcome)
            records.append(record)
        return cls(records, options, lengths if processor is not None else None, skips)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The epoch about to run (accelerate's loader calls this), so that each epoch draws other frames."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        item = load_item(self.records[index], self.options)
        if isinstance(item, dict) and item["sample"].get("videos"):
            # the SAM 2 frames of a video row: one draw per place in the epoch (FILE#N repeats differ) and epoch
            item["sample"]["frame_draw"] = self.epoch * len(self.records) + index
        return item
