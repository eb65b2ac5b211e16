"""DICOM through pydicom: one frame, the modality LUT (Rescale Slope/Intercept), the file's window.

Multi-frame files give one frame (only that frame is decoded); enhanced files are read through their functional
groups; compressed transfer syntaxes decode through the pylibjpeg plugins. Sizes are checked from the header
before any pixel is decoded (:mod:`~citrus_v.media.dicom_source`). pydicom is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dicom_source import decode_frame, open_dicom, read_declared_size
from .errors import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_IMAGE_PIXELS, MedicalImageError
from .windowing import Window, apply_window, full_range_window, parse_window


@dataclass
class DicomImage:
    """One decoded DICOM frame: modality values (e.g. Hounsfield units) or RGB, and how to display them."""

    values: np.ndarray  # [H, W] float64 after the modality LUT, or [H, W, 3] uint8 for colour
    photometric: str
    window: Window | None  # the file's own window (first value), if any
    frame: int
    num_frames: int

    def to_uint8(self, window: str | Window | None = None) -> np.ndarray:
        """8-bit display pixels: the given window, else the file's, else full range; MONOCHROME1 inverted."""
        if self.values.ndim == 3:
            return self.values
        chosen = parse_window(window) or self.window or full_range_window(self.values)
        pixels = apply_window(self.values, chosen)
        return 255 - pixels if self.photometric == "MONOCHROME1" else pixels


def read_dicom(
    path: str | Path,
    frame: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> DicomImage:
    """Decode one frame of a DICOM file to modality values (rescale slope/intercept applied).

    Checked from the header before any pixel is decoded: one frame's Rows x Columns against ``max_pixels``, every
    frame's decoded bytes against ``max_bytes``; a deflated file is inflated no further than that allows.
    """
    path = Path(path)
    source = open_dicom(path, max_pixels, max_bytes)
    index = 0 if frame is None else int(frame)
    if not 0 <= index < source.declared.frames:
        raise MedicalImageError(
            f"{path}: frame {index} does not exist; the file has {source.declared.frames} frame(s) "
            f"(0..{source.declared.frames - 1})",
            "bad_reference",
        )
    raw = decode_frame(path, source, index)
    ds = source.header
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if raw.ndim == 3:  # colour; pydicom converts YBR to RGB
        return DicomImage(_to_uint8_rgb(raw), photometric, None, index, source.declared.frames)
    values = _modality_values(path, ds, index, raw)
    return DicomImage(values, photometric, _file_window(ds, index), index, source.declared.frames)


def dicom_size(
    path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
) -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decoding), with the checks of :func:`read_dicom`."""
    declared = read_declared_size(path, max_pixels, max_bytes)
    return declared.columns, declared.rows


def _modality_values(path: Path, ds: Any, index: int, raw: np.ndarray) -> np.ndarray:
    """Stored grey pixels through the modality LUT (the frame's own rescale in enhanced files), as float64."""
    from pydicom.pixels import apply_modality_lut

    try:
        transform = _functional_group(ds, index, "PixelValueTransformationSequence")
        if transform is not None and "RescaleSlope" in transform:
            slope, intercept = float(transform.RescaleSlope), float(transform.get("RescaleIntercept", 0))
            values = raw.astype(np.float64) * slope + intercept
        else:
            values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    except (TypeError, ValueError, AttributeError) as err:
        raise MedicalImageError(f"{path}: unusable modality LUT / RescaleSlope / RescaleIntercept ({err})") from err
    if not np.isfinite(values).all():
        raise MedicalImageError(
            f"{path}: pixel values are not finite after RescaleSlope/RescaleIntercept; fix those tags",
            "unreadable_image",
        )
    return values


def _file_window(ds: Any, index: int) -> Window | None:
    """The frame's (else the file's) first Window Center/Width; ``None`` when absent or unusable."""
    try:
        voi = _functional_group(ds, index, "FrameVOILUTSequence")
        source = voi if voi is not None and "WindowCenter" in voi else ds
        center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
    except (TypeError, ValueError):  # an unreadable window is ignored: the full range is shown instead
        return None
    usable = center is not None and width is not None and np.isfinite([center, width]).all() and width > 0
    return Window(center, width) if usable else None


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _functional_group(ds: Any, frame: int, sequence: str) -> Any | None:
    """An item of a functional-group sequence for ``frame`` (per-frame first, then shared), for enhanced files."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index and sequence in seq[index]:
            items = seq[index].get(sequence)  # the sequence's value (indexing by name gives the element)
            if items is not None and len(items):
                return items[0]
    return None


def _to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return apply_window(array, full_range_window(array))
