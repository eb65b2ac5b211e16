"""One evaluation sample, whatever dataset it came from, and the error raised for bad ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("seg", "det", "vqa", "report", "doc", "cot")

# Citrus-V row tasks (``row["task"]``) -> evaluation task
ROW_TASKS = {
    "segmentation": "seg",
    "detection": "det",
    "vqa-closed": "vqa",
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
    (det), the answer text (vqa, doc, cot) or the report text (report). ``groups`` holds what metrics are
    averaged by (``dataset``, ``modality``, ``region``, ``answer_type``, ...).
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

    def where(self) -> str:
        return f"sample {self.id!r} ({self.source})"
