"""Windowing: modality values (Hounsfield units, 16-bit grey) to 8-bit display pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MedicalImageError

# Hounsfield-unit windows (center, width); the usual radiology defaults.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct-abdomen": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
    "ct-liver": (30.0, 150.0),
}


@dataclass(frozen=True)
class Window:
    """A linear VOI window: values ``center ± width/2`` map to black..white."""

    center: float
    width: float


def parse_window(spec: str | Window | tuple[float, float] | None) -> Window | None:
    """``None``/``"file"`` -> ``None`` (use the file's own window); a preset name or ``"C,W"`` -> a :class:`Window`."""
    if spec is None or isinstance(spec, Window):
        return spec
    if isinstance(spec, tuple):
        return Window(float(spec[0]), float(spec[1]))
    text = str(spec).strip().lower()
    if text in ("", "file", "auto"):
        return None
    if text in WINDOW_PRESETS:
        return Window(*WINDOW_PRESETS[text])
    parts = text.split(",")
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if width <= 0:
                raise MedicalImageError(f"window {spec!r}: the width must be positive", "bad_reference")
            return Window(center, width)
    raise MedicalImageError(
        f"unknown window {spec!r}: use 'file', a preset ({', '.join(WINDOW_PRESETS)}) or 'CENTER,WIDTH' "
        "such as '40,400'",
        "bad_reference",
    )


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2) to 8 bits."""
    center, width = float(window.center), max(float(window.width), 1.0)
    scaled = ((values.astype(np.float64) - (center - 0.5)) / (width - 1.0) + 0.5) if width > 1 else None
    if scaled is None:  # width 1: a threshold
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def full_range_window(values: np.ndarray) -> Window:
    """The window spanning an array's own min..max (what an image without window information gets)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return Window(0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    return Window((lo + hi + 1.0) / 2.0, max(hi - lo + 1.0, 1.0))
