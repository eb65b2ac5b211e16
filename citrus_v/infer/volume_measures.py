"""What a 3-D mask measures: volume in millilitres, area on each frame, the frames it is on, its 3-D box.

Frame, row and column indices are 0-based and in the volume's display orientation (frame ``k`` is
``volume.frames[k]``); ranges are half-open ``[start, stop)``, as a 2-D mask's ``bbox_xyxy`` is. Millimetres
come from the volume's ``spacing`` ``(between frames, row, column)``; a volume without spacing (an
uncalibrated clip) gets pixel measures only. A clip's frames are moments, not slices, so a clip has no volume
in millilitres even with a pixel spacing: its areas in mm² stand. A volume that holds a sample of its source's
frames (``volume.source_frames``) names frames by their source index, and gets a volume in millilitres only
when the sample is contiguous (slices skipped between samples would be guessed, not measured).

numpy only, so the server and the web app measure without the model's stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..media.volume import Volume
from .volume_masks import MaskInput, frame_step, mask_stacks, source_frames


@dataclass(frozen=True)
class FrameArea:
    """The mask's area on one frame."""

    frame: int
    area_px: int
    area_mm2: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"frame": self.frame, "area_px": self.area_px, "area_mm2": self.area_mm2}


@dataclass(frozen=True)
class BoundingBox3D:
    """The smallest box holding the mask: half-open index ranges, and its size in mm when spacing is known."""

    frames: tuple[int, int]
    rows: tuple[int, int]
    columns: tuple[int, int]
    size_mm: tuple[float | None, float, float] | None = None  # (along frames: None for a clip, rows, columns)

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": list(self.frames),
            "rows": list(self.rows),
            "columns": list(self.columns),
            "size_mm": None if self.size_mm is None else list(self.size_mm),
        }


@dataclass
class VolumeMeasures:
    """The measures of one target's mask stack over a volume or clip."""

    index: int  # which target (0-based), as the masks are numbered from 1 in files and pictures
    label: str | None
    voxels: int
    volume_ml: float | None  # None: a clip, or no spacing
    spacing: tuple[float, float, float] | None
    frames: list[int] = field(default_factory=list)  # frames with mask
    areas: list[FrameArea] = field(default_factory=list)  # one per frame with mask
    bbox3d: BoundingBox3D | None = None  # None: an empty mask

    @property
    def present(self) -> bool:
        return self.voxels > 0

    def to_json(self) -> dict[str, Any]:
        """The fields of ``prediction.json`` for this mask."""
        return {
            "index": self.index,
            "label": self.label,
            "voxels": self.voxels,
            "volume_ml": self.volume_ml,
            "spacing": None if self.spacing is None else list(self.spacing),
            "frames": list(self.frames),
            "areas": [area.to_json() for area in self.areas],
            "bbox3d": None if self.bbox3d is None else self.bbox3d.to_json(),
        }


def measure_masks(
    volume: Volume, masks: MaskInput, labels: Sequence[str | None] | None = None
) -> list[VolumeMeasures]:
    """The measures of each target's ``[N, H, W]`` mask stack over ``volume`` (see :func:`mask_stacks`)."""
    stacks = mask_stacks(masks, volume.values.shape)
    labels = [None] * len(stacks) if labels is None else list(labels)
    if len(labels) != len(stacks):
        raise ValueError(f"{len(stacks)} masks but {len(labels)} labels: give one label (or None) per mask")
    return [measure_stack(volume, stack, k, labels[k]) for k, stack in enumerate(stacks)]


def measure_stack(volume: Volume, stack: np.ndarray, index: int = 0, label: str | None = None) -> VolumeMeasures:
    """The measures of one boolean ``[N, H, W]`` stack (already checked against the volume's shape)."""
    spacing = None if volume.spacing is None else tuple(float(s) for s in volume.spacing)
    numbers = source_frames(volume)
    per_frame = stack.reshape(stack.shape[0], -1).sum(axis=1)
    marked = [int(k) for k in np.flatnonzero(per_frame)]
    pixel_mm2 = None if spacing is None else spacing[1] * spacing[2]
    areas = [
        FrameArea(numbers[k], int(per_frame[k]), None if pixel_mm2 is None else _round(per_frame[k] * pixel_mm2))
        for k in marked
    ]
    voxels = int(per_frame.sum())
    volume_ml = None
    if spacing is not None and volume.kind == "volume" and frame_step(numbers) == 1:
        volume_ml = _round(voxels * float(np.prod(spacing)) / 1000.0)
    bbox = _bbox3d(stack, numbers, spacing, volume.kind == "clip")
    return VolumeMeasures(index, label, voxels, volume_ml, spacing, [numbers[k] for k in marked], areas, bbox)


def _bbox3d(
    stack: np.ndarray, numbers: list[int], spacing: tuple[float, float, float] | None, clip: bool
) -> BoundingBox3D | None:
    """The box in source frame numbers (``numbers[k]`` for frame ``k``), rows and columns."""
    if not stack.any():
        return None
    ranges = []
    for axis in range(3):
        hits = np.flatnonzero(stack.any(axis=tuple(a for a in range(3) if a != axis)))
        ranges.append((int(hits[0]), int(hits[-1]) + 1))
    ranges[0] = (numbers[ranges[0][0]], numbers[ranges[0][1] - 1] + 1)
    size = None
    if spacing is not None:
        extents = zip(ranges, spacing, strict=True)
        depth, rows, columns = (_round((stop - start) * step) for (start, stop), step in extents)
        size = (None if clip else depth, rows, columns)
    return BoundingBox3D(ranges[0], ranges[1], ranges[2], size)


def _round(value: float) -> float:
    """Six significant digits: more than any voxel spacing holds, and a stable JSON."""
    return float(f"{float(value):.6g}")
