"""Absent targets: whether the model draws something that is not there, and still draws what is.

An **absent** sample asks to segment or detect a target its image or volume does not show (the row says so
with ``meta.absent: true``; its kind in ``meta.absent_kind``: a lesion-free scan, an organ outside the field
of view, a target the modality cannot show). The right answer says so in words and gives no ``[SEG]``, no mask
and no box.

- **False mask** (per sample, 0/1): the answer has a ``[SEG]`` token, or any non-empty mask (2-D or a stack),
  or any box. The **false-mask rate** is their share over the absent samples (overall, per kind, per target);
  its parts ``false_seg_rate`` (a ``[SEG]`` or a mask) and ``false_box_rate`` are reported next to it.
- **``[SEG]`` emitted for present targets**: over the same run's ``seg`` and ``seg3d`` samples whose reference
  has at least one mask, the share whose answer has a ``[SEG]`` token or a mask. A model that never draws
  anything has a false-mask rate of 0; this is the other side of the same skill, and both are reported
  together (the issue's bars: false-mask rate ≤ 5 % with ``[SEG]`` still emitted for ≥ 95 % of present targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..tokens import SEG_TOKEN

Record = dict[str, Any]

# The kinds of absent target a row may name in ``meta.absent_kind`` (other strings are reported as they are).
ABSENT_KINDS = ("lesion_free", "out_of_field", "not_shown")
# The quality bars: (metric key, what it is, direction, bar).
BARS: tuple[tuple[str, str, str, float], ...] = (
    ("false_mask_rate", "false-mask rate on absent targets", "<=", 0.05),
    ("seg_emitted_present", "[SEG] emitted for present targets", ">=", 0.95),
)
# tasks whose samples with a reference mask are "present targets"
PRESENT_TASKS = ("seg", "seg3d")


def grounding_given(text: str, masks: Sequence[np.ndarray], boxes: Sequence[Any]) -> dict[str, Any]:
    """What an answer drew: ``[SEG]`` tokens, masks (and their foreground voxels), boxes, and the 0/1 scores."""
    seg_tokens = (text or "").count(SEG_TOKEN)
    voxels = sum(int(np.count_nonzero(np.asarray(mask))) for mask in masks)
    false_seg = seg_tokens > 0 or voxels > 0
    false_box = len(boxes) > 0
    return {
        "parsed": {"seg_tokens": seg_tokens, "num_masks": len(masks), "mask_voxels": voxels, "num_boxes": len(boxes)},
        "scores": {
            "false_mask": float(false_seg or false_box),
            "false_seg": float(false_seg),
            "false_box": float(false_box),
        },
    }


def absent_metrics(records: Sequence[Record]) -> dict[str, Any]:
    """False-mask rate and its parts over absent-target records."""
    def rate(key: str) -> float | None:
        values = [float(r["scores"][key]) for r in records if r["scores"].get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "n": len(records),
        "false_mask_rate": rate("false_mask"),
        "false_seg_rate": rate("false_seg"),
        "false_box_rate": rate("false_box"),
    }


def seg_emitted(record: Record) -> bool:
    """Whether a ``seg``/``seg3d`` record's answer has a ``[SEG]`` token or a mask."""
    return SEG_TOKEN in (record.get("output") or "") or int((record.get("parsed") or {}).get("num_masks") or 0) > 0


def present_seg_rate(records: Sequence[Record]) -> dict[str, Any]:
    """``[SEG]``-emitted rate over the scored ``seg``/``seg3d`` records that have something to segment."""
    present = [
        r for r in records
        if r.get("task") in PRESENT_TASKS and r.get("status") != "failed"
        and int((r.get("reference") or {}).get("num_masks") or 0) > 0
    ]
    return {
        "n_present": len(present),
        "seg_emitted_present": float(np.mean([seg_emitted(r) for r in present])) if present else None,
    }
