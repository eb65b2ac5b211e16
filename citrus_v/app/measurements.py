"""Measurements of each mask the server returned: area in pixels, in mm² where the pixel spacing is known, and its box.

The masks are in the pixels of the image that was sent (one DICOM frame or NIfTI slice at its own resolution), so
the scan's pixel spacing applies to them directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..infer.results import MaskResult


@dataclass(frozen=True)
class PixelSpacing:
    """Physical size of one displayed pixel: ``row_mm`` between rows (vertical), ``col_mm`` between columns."""

    row_mm: float
    col_mm: float
    source: str  # where it was read, e.g. "DICOM PixelSpacing", said next to the areas

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_mm * self.col_mm


def usable_spacing(row_mm: float, col_mm: float, source: str) -> PixelSpacing | None:
    """A :class:`PixelSpacing`, or ``None`` when a value is not a positive finite number (files carry ``0\\0``)."""
    values = (float(row_mm), float(col_mm))
    if not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return PixelSpacing(values[0], values[1], source)


@dataclass(frozen=True)
class MaskMeasurement:
    """One mask as the legend lists it (``number`` is 1-based, the number drawn on the overlay)."""

    number: int
    label: str | None
    score: float  # SAM 2's predicted IoU of the mask: the model's own estimate, not a measured overlap
    area_px: int
    area_mm2: float | None
    bbox: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in pixels, x2/y2 exclusive; None for an empty mask

    @property
    def empty(self) -> bool:
        return self.area_px == 0


def measure_masks(masks: Sequence[MaskResult], spacing: PixelSpacing | None) -> list[MaskMeasurement]:
    """Measure each mask, in the order the overlay numbers them."""
    measured = []
    for position, item in enumerate(masks):
        area = int(np.count_nonzero(item.mask))
        area_mm2 = area * spacing.pixel_area_mm2 if spacing is not None else None
        measured.append(MaskMeasurement(position + 1, item.label, float(item.score), area, area_mm2, item.bbox))
    return measured
