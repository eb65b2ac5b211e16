"""Which window presets the page offers: Hounsfield-unit presets only for CT, nothing for MR, X-ray or photos.

A DICOM file says its modality; a NIfTI file does not, so a volume counts as CT when its values look like
Hounsfield units: at least one voxel in a hundred is air (-1000 HU; MR, PET and 8-bit images have no such
block of strongly negative values), nothing lies below the scanners' padding value, and bone, not MR's
arbitrary scale, is the top of the range.
"""

from __future__ import annotations

import numpy as np

from ..media import WINDOW_PRESETS

FILE_WINDOW = "file"  # the file's own window (DICOM Window Center/Width), else the full range of values
CT_MODALITIES = frozenset({"CT"})
HU_AIR_MAX = -500.0  # the 1st percentile of a CT volume is at most this (air is -1000 HU)
HU_PADDING_MIN = -3100.0  # nothing below this (scanners pad outside the field of view with -2048, -3024 or -3072)
HU_TOP_MAX = 4000.0  # the 99th percentile is at most this (dense bone is below 2000 HU)
MAX_SAMPLES = 1_000_000  # values looked at, evenly spread, so that large volumes are judged quickly


def hounsfield_like(values: np.ndarray) -> bool:
    """Whether an array's value range looks like a CT volume in Hounsfield units."""
    flat = np.asarray(values).ravel()
    flat = flat[:: max(1, flat.size // MAX_SAMPLES)]
    finite = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if finite.size == 0:
        return False
    low, high = np.percentile(finite, [1, 99])
    return float(finite.min()) >= HU_PADDING_MIN and low <= HU_AIR_MAX and high <= HU_TOP_MAX


def is_ct(kind: str, modality: str | None = None, values: np.ndarray | None = None) -> bool:
    """CT by the DICOM Modality tag, or (NIfTI, no modality tag) by a Hounsfield-like value range."""
    if kind == "dicom":
        return (modality or "").strip().upper() in CT_MODALITIES
    if kind == "nifti":
        return values is not None and hounsfield_like(values)
    return False


def window_choices(ct: bool) -> list[str]:
    """The window menu: the file's own window and the CT presets for CT; empty (menu hidden) otherwise."""
    return [FILE_WINDOW, *WINDOW_PRESETS] if ct else []
