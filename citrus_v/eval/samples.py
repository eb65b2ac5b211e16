"""One evaluation sample, whatever dataset it came from, and the error raised for bad ground truth."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the tasks on one 2-D image per question
TASKS = ("seg", "det", "vqa", "report", "doc", "cot")
# every task: also ``seg3d`` (a mask stack per [SEG] over a volume or clip, scored in 3-D) and ``absent``
# (rows with ``meta.absent: true``: a target that is not there, scored by the false-mask rate); ``all`` = these
ALL_TASKS = TASKS + ("seg3d", "absent")

# Citrus-V row tasks (``row["task"]``) -> evaluation task
ROW_TASKS = {
    "segmentation": "seg",
    "segmentation-3d": "seg",  # a volume or clip: scored as seg3d (see row_eval_task)
    "detection": "det",
    "vqa-closed": "vqa",
    "vqa-closed-3d": "vqa",
    "vqa-open": "vqa",
    "vqa": "vqa",
    "report": "report",
    "document": "doc",
    "cot": "cot",
}


class EvalDataError(ValueError):
    """A dataset that cannot be evaluated: missing, malformed, or a sample with bad ground truth."""


@dataclass
class EvalSample:
    """A question with its images and reference, ready for any backend.

    ``prompt`` is the user turn with one ``<image>`` placeholder per image (where the image goes);
    ``reference`` depends on ``task``: mask references (seg), ``[x1, y1, x2, y2]`` boxes in original pixels
    (det), the answer text (vqa, doc, cot), the report text (report), 3-D mask references on the video's grid
    (seg3d) or ``{"target", "kind", "asked", "answer"}`` (absent). ``groups`` holds what metrics are averaged by
    (``dataset``, ``modality``, ``region``, ``answer_type``, ``target``, ``absent_kind``, ...).
    """

    id: str
    task: str
    prompt: str
    images: list[Any]
    reference: Any
    source: str  # file:line (or file:item) for messages
    base_dir: Path | None = None
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    options: dict[str, str] | None = None  # multiple-choice options by letter
    answer_type: str | None = None  # vqa: "closed" or "open"; doc: "qa" or "extraction"
    groups: dict[str, str] = field(default_factory=dict)
    spacing: tuple[float, float] | None = None  # mm per pixel (row, col), when known
    template: str | None = None  # the prompt template's name (see prompts.py)
    videos: list[Any] = field(default_factory=list)  # volume or clip references (ms-swift's "videos")

    def where(self) -> str:
        return f"sample {self.id!r} ({self.source})"


def row_eval_task(row: Mapping[str, Any], task: str | None) -> str | None:
    """The evaluation task of a Citrus-V row whose row task maps to ``task`` (see :data:`ROW_TASKS`).

    A segmentation or detection row with ``meta.absent: true`` is ``absent``; a segmentation row about a volume or
    clip (``"videos"``) is ``seg3d``; any other row keeps ``task``.
    """
    meta = row.get("meta") if isinstance(row.get("meta"), Mapping) else {}
    if meta.get("absent") is True and task in ("seg", "det"):
        return "absent"
    if task == "seg" and row.get("videos"):
        return "seg3d"
    return task


def with_row_fields(sample: EvalSample, row: Mapping[str, Any]) -> EvalSample:
    """Complete a sample made from ``row`` with what the volume and absent tasks read: the videos; for ``seg3d``
    and ``absent`` samples the target (``meta.target``, else ``meta.organ``) and the absent kind
    (``meta.absent_kind``) as groups, and the reference (the 3-D mask references; what is absent). Raises
    :class:`~citrus_v.data.rows.RowProblem` for a row whose ground truth is unusable."""
    from ..data.rows import RowProblem, count_seg, row_task

    meta = row.get("meta") if isinstance(row.get("meta"), Mapping) else {}
    videos = row.get("videos") or []
    if not isinstance(videos, list):
        raise RowProblem("schema", "'videos' must be a list of volume or clip references")
    sample.videos = list(videos)
    if sample.task not in ("seg3d", "absent"):
        return sample
    target = meta.get("target") or meta.get("organ")
    if target:
        sample.groups["target"] = str(target)
    if sample.task == "seg3d":
        masks = list(row.get("masks") or [])
        if len(sample.videos) != 1:
            raise RowProblem("schema", f"a volume segmentation row needs one video, it has {len(sample.videos)}")
        if count_seg(row) != len(masks):
            raise RowProblem("seg_mask_count", f"{count_seg(row)} [SEG] token(s) but {len(masks)} mask(s)")
        sample.reference = masks
    elif sample.task == "absent":
        if not sample.images and not sample.videos:
            raise RowProblem("schema", "an absent-target row needs an image or a video")
        kind = meta.get("absent_kind")
        if kind:
            sample.groups["absent_kind"] = str(kind)
        sample.reference = {"target": None if not target else str(target), "kind": None if not kind else str(kind),
                            "asked": row_task(row), "answer": sample.reference}
    return sample
