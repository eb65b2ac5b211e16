"""Dataset statistics: rows per task and modality, and token-length percentiles (``citrus-v data stats``).

Images are counted twice over: references (one per image a row names, so one scan asked about in five rows
counts five times) and distinct image files (a file named by several rows, or several slices or frames of one
volume, counts once). Videos (volumes and clips) likewise, with the frames they hold (from their headers) and
the frames the model sees of them; absent-target rows (``meta.absent``) are counted apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..media import MedicalImageError, parse_ref
from ..processing.template import ChatTemplate, TemplateError, place_images, place_videos
from .rows import RowRecord, render_objects
from .validate import RowInfo, ValidationOptions, ValidationReport, validate_files

PERCENTILES = (50, 90, 95, 99, 100)


def row_image_files(record: RowRecord, key: str = "images") -> set[Path]:
    """The files a row's image (or, with ``key="videos"``, video) references name (fragments such as
    ``#slice=40`` dropped)."""
    files = set()
    for ref in record.row.get(key) or []:
        try:
            files.add(parse_ref(ref, record.base_dir).path.resolve())
        except MedicalImageError:
            continue  # a row with a bad reference is rejected by validation before it is counted
    return files


def token_length(record: RowRecord, info: RowInfo, template: ChatTemplate, options: ValidationOptions) -> int:
    """Tokens of a row after the template (image tokens from the smart-resized image sizes, video tokens from the
    frames the model samples and their size)."""
    scaler = options.scaler(*info.image_sizes[0]) if info.image_sizes else None
    tokens, videos = info.image_tokens(options), info.video_tokens(options)
    messages = place_videos(place_images(render_objects(record.row, scaler), len(tokens)), len(videos))
    encoded = template.encode(messages, tokens, system=record.row.get("system"), video_tokens=videos)
    return len(encoded.input_ids)


@dataclass
class DatasetStats:
    report: ValidationReport
    tasks: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    masks: int = 0
    image_refs: int = 0
    image_files: set[Path] = field(default_factory=set)
    video_refs: int = 0
    video_files: set[Path] = field(default_factory=set)
    video_frames: int = 0  # frames the referenced videos hold, summed over references
    model_frames: int = 0  # frames the model sees of them
    absent: int = 0  # absent-target rows
    unmeasured: int = 0  # rows whose token length the template could not give (a tokenizer without video tokens)

    def percentiles(self) -> dict[int, int]:
        if not self.lengths:
            return {}
        values = np.percentile(np.array(self.lengths), PERCENTILES, method="higher")
        return {p: int(v) for p, v in zip(PERCENTILES, values, strict=True)}

    def format(self) -> str:
        lines = [
            self.report.format(limit=10),
            f"image references {self.image_refs} (distinct image files {len(self.image_files)}), masks {self.masks}",
            f"video references {self.video_refs} (distinct video files {len(self.video_files)}), frames "
            f"{self.video_frames} (the model sees {self.model_frames}), absent-target rows {self.absent}",
        ]
        lines.append("rows per task: " + ", ".join(f"{k} {v}" for k, v in sorted(self.tasks.items())))
        lines.append("rows per modality: " + ", ".join(f"{k} {v}" for k, v in sorted(self.modalities.items())))
        pct = self.percentiles()
        if pct:
            spread = ", ".join(f"p{p} {v}" for p, v in pct.items())
            lines.append(f"token length: {spread}, mean {np.mean(self.lengths):.0f}")
        if self.unmeasured:
            lines.append(f"token length not measured for {self.unmeasured} row(s): the tokenizer has no video token")
        return "\n".join(lines)


def dataset_stats(
    paths: Sequence[str | Path], template: ChatTemplate, options: ValidationOptions | None = None
) -> DatasetStats:
    """Validate (headers only) and count the rows of ``paths``; token lengths use ``template``."""
    options = options or ValidationOptions(decode=False)
    report = validate_files(paths, options, keep_infos=True)
    stats = DatasetStats(report)
    for record, info in report.infos:
        stats.tasks[info.task] += 1
        stats.modalities[info.modality] += 1
        stats.image_refs += len(info.image_sizes)
        stats.image_files.update(row_image_files(record))
        stats.video_refs += len(info.videos)
        stats.video_files.update(row_image_files(record, "videos"))
        stats.video_frames += sum(header.num_frames for header in info.videos)
        stats.model_frames += sum(info.sampled_frames(options))
        stats.absent += int(info.absent)
        stats.masks += info.num_seg
        try:
            stats.lengths.append(token_length(record, info, template, options))
        except TemplateError:
            stats.unmeasured += 1
    report.infos.clear()
    return stats

