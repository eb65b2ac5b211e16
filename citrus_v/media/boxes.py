"""The box type: an axis-aligned rectangle in pixels, shared by parsing, prediction, serving and the app.

Only the value type lives here; the model's box convention (formatting, parsing, coordinate scaling) is
:mod:`citrus_v.processing.boxes`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Box:
    """An axis-aligned box ``[x1, y1, x2, y2]`` in pixels (which image's pixels depends on the caller)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    @property
    def xyxy(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def as_tuple(self) -> tuple[float, float, float, float, str]:
        """``(x1, y1, x2, y2, label)``."""
        return (self.x1, self.y1, self.x2, self.y2, self.label)

    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other`` (0 when both are empty)."""
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area() + other.area() - inter
        return inter / union if union > 0 else 0.0

    def inside(self, width: float, height: float) -> bool:
        """Whether the box lies within a ``width × height`` image and has ``x1 <= x2``, ``y1 <= y2``."""
        return 0 <= self.x1 <= self.x2 <= width and 0 <= self.y1 <= self.y2 <= height
