"""Masks: COCO RLE and polygons (pycocotools, imported on first use), and mask or label-map references.

A mask reference is an image reference (PNG: non-zero is foreground; a NIfTI label volume: a slice, optionally
only some label values) or an inline dict: COCO RLE ``{"size": [h, w], "counts": ...}`` or
``{"polygons": [[x, y, ...]], "size": [h, w]}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import read_dicom
from .errors import MedicalImageError
from .nifti import read_nifti
from .raster import open_raster
from .refs import MediaRef, parse_ref


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed string or uncompressed list ``counts``) to a boolean ``[H, W]`` mask."""
    from pycocotools import mask as mask_utils

    if "size" not in rle or "counts" not in rle:
        raise MedicalImageError("a COCO RLE mask needs 'size' [h, w] and 'counts'", "bad_mask")
    height, width = _mask_size(rle["size"], "a COCO RLE mask")
    counts = rle["counts"]
    if not isinstance(counts, (str, bytes, list)):
        raise MedicalImageError(f"COCO RLE counts must be a string or a list of integers, got {counts!r}", "bad_mask")
    try:
        if isinstance(counts, list):
            encoded = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            encoded = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 copy= notice
            decoded = mask_utils.decode(encoded)
    except Exception as err:  # pycocotools raises bare exceptions on malformed counts
        raise MedicalImageError(f"invalid COCO RLE counts ({err})", "bad_mask") from err
    return decoded.astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean ``[H, W]`` mask as compressed COCO RLE with a JSON-ready string ``counts``."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixels) to a boolean mask."""
    from pycocotools import mask as mask_utils

    try:
        polys = [list(map(float, p)) for p in polygons]
    except (TypeError, ValueError) as err:
        raise MedicalImageError(f"polygons must be lists of numbers ({err})", "bad_mask") from err
    if not polys or any(len(p) < 6 or len(p) % 2 for p in polys):
        raise MedicalImageError("each polygon needs at least 3 (x, y) points as a flat list", "bad_mask")
    if not all(np.isfinite(p).all() for p in polys):
        raise MedicalImageError("polygon coordinates must be finite numbers", "bad_mask")
    rles = mask_utils.frPyObjects(polys, height, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 copy= notice
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def read_mask(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a mask reference as a boolean ``[H, W]`` array (non-zero, or ``== label`` when a label is named).

    ``size`` is ``(width, height)`` of the image, needed by polygons without their own ``size``.
    """
    if isinstance(ref, Mapping) and "counts" in ref:
        return rle_to_mask(ref)
    if isinstance(ref, Mapping) and "polygons" in ref:
        if "size" in ref:
            height, width = _mask_size(ref["size"], "a polygon mask")
        elif size is not None:
            width, height = size
        else:
            raise MedicalImageError("a polygon mask needs 'size' [h, w] (or the image size)", "bad_mask")
        return polygons_to_mask(ref["polygons"], height, width)
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    if parsed.kind == "nifti":
        volume = read_nifti(parsed.path, parsed.t, None)
        plane = volume.slice(parsed.slice, 2 if parsed.axis is None else parsed.axis)
        return np.isin(plane, parsed.label) if parsed.label is not None else plane > 0
    if parsed.kind == "dicom":
        values = read_dicom(parsed.path, parsed.frame, None).values
        if values.ndim == 3:  # a colour file: any channel counts, as for raster masks
            values = values.max(axis=-1)
        return np.isin(values, parsed.label) if parsed.label is not None else values > 0
    opened = open_raster(parsed.path, None)
    try:
        with opened:
            array = np.asarray(opened)
    except OSError as err:
        raise MedicalImageError(f"{parsed.path}: truncated or corrupt mask ({err})", "truncated_image") from err
    if array.ndim == 3:
        array = array.max(axis=-1)
    return np.isin(array, parsed.label) if parsed.label is not None else array > 0


def read_label_map(ref: str | Path, base_dir: str | Path | None = None) -> np.ndarray:
    """Read a single-channel label image (PNG or another raster; 8 or 16 bit) as an integer ``[H, W]`` array.

    Used for training-only label maps whose pixel values are classes (a character map), where a mask reader would
    binarise them.
    """
    parsed = parse_ref(ref, base_dir)
    if parsed.kind != "raster":
        raise MedicalImageError(f"{parsed.path}: a label map must be a raster image such as PNG", "bad_mask")
    opened = open_raster(parsed.path, None)
    try:
        with opened:
            if opened.mode not in ("L", "I", "I;16", "P"):
                raise MedicalImageError(
                    f"{parsed.path}: a label map must have one channel of class numbers (mode {opened.mode})",
                    "bad_mask",
                )
            array = np.asarray(opened)
    except OSError as err:
        raise MedicalImageError(f"{parsed.path}: truncated or corrupt label map ({err})", "truncated_image") from err
    return array.astype(np.int64)


def _mask_size(value: Any, what: str) -> tuple[int, int]:
    """``[h, w]`` of a mask object as two positive integers, or a ``bad_mask`` error saying what is wrong."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise MedicalImageError(
            f"{what} needs 'size' [height, width] as two positive integers, got {value!r}", "bad_mask"
        )
    return int(value[0]), int(value[1])
