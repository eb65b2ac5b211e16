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
from .errors import DEFAULT_MAX_IMAGE_PIXELS, MedicalImageError, check_pixels
from .nifti import read_nifti
from .raster import open_raster
from .refs import MediaRef, parse_ref

# How far (in pixels) a polygon point may lie outside its image: outlines traced on pixel edges end at w or h.
POLYGON_TOLERANCE = 1.0


def rle_to_mask(
    rle: Mapping[str, Any],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    image_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode COCO RLE (compressed string or uncompressed list ``counts``) to a boolean ``[H, W]`` mask.

    Checked before anything is decoded: the size is at most ``max_pixels`` pixels and, when ``image_size``
    ``(width, height)`` is given, that image's size; the run lengths are non-negative and sum to exactly
    ``h * w`` (pycocotools would leave the rest of a short mask uninitialised).
    """
    from pycocotools import mask as mask_utils

    if "size" not in rle or "counts" not in rle:
        raise MedicalImageError("a COCO RLE mask needs 'size' [h, w] and 'counts'", "bad_mask")
    height, width = _mask_size(rle["size"], "a COCO RLE mask")
    _check_extent("a COCO RLE mask", height, width, max_pixels, image_size)
    counts = rle["counts"]
    if not isinstance(counts, (str, bytes, list)):
        raise MedicalImageError(f"COCO RLE counts must be a string or a list of integers, got {counts!r}", "bad_mask")
    runs = _list_runs(counts, height * width) if isinstance(counts, list) else _string_runs(counts, height * width)
    if sum(runs) != height * width:
        raise MedicalImageError(
            f"COCO RLE counts sum to {sum(runs)} pixels but size [{height}, {width}] needs exactly "
            f"{height * width}. Fix: re-encode the mask (pycocotools.mask.encode)",
            "bad_mask",
        )
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


def _list_runs(counts: list, pixels: int) -> list[int]:
    """The run lengths of uncompressed RLE ``counts``: non-negative integers; stops once they exceed ``pixels``."""
    runs: list[int] = []
    total = 0
    for k, value in enumerate(counts):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MedicalImageError(
                f"COCO RLE counts[{k}] is {value!r}: run lengths must be non-negative integers", "bad_mask"
            )
        runs.append(value)
        total += value
        if total > pixels:
            break
    return runs


def _string_runs(counts: str | bytes, pixels: int) -> list[int]:
    """The run lengths of compressed COCO RLE ``counts``, decoded as pycocotools' ``rleFrString`` does (6 bits
    per character from ``'0'``, a continuation bit, a sign bit, each run after the second stored as the difference
    to the run two before), without allocating the mask; stops once they exceed ``pixels``."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    total = value = shift = 0
    for position, byte in enumerate(data):
        code = byte - 48
        if not 0 <= code < 64:
            raise MedicalImageError(
                f"COCO RLE counts: character {chr(byte)!r} at position {position} is not part of the compressed "
                "format ('0' to 'o')",
                "bad_mask",
            )
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            if shift > 60:  # pycocotools reads into 64 bits: a longer number is garbage
                raise MedicalImageError(f"COCO RLE counts: a run at position {position} is too long", "bad_mask")
            continue
        if code & 0x10:  # sign bit of the last group
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise MedicalImageError(f"COCO RLE counts: run {len(runs)} has a negative length ({value})", "bad_mask")
        runs.append(value)
        total += value
        if total > pixels:
            break
        value = shift = 0
    else:
        if shift:
            raise MedicalImageError("COCO RLE counts end in the middle of a number (truncated string)", "bad_mask")
    return runs


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean ``[H, W]`` mask as compressed COCO RLE with a JSON-ready string ``counts``."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def polygons_to_mask(
    polygons: list[list[float]], height: int, width: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Rasterise COCO polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixels) to a boolean mask.

    Checked before rasterising: the mask is at most ``max_pixels`` pixels, every point lies on the image (within
    :data:`POLYGON_TOLERANCE` pixels) and the outlines are not longer than the image could hold (pycocotools
    walks every outline pixel by pixel, so its work grows with their length).
    """
    from pycocotools import mask as mask_utils

    _check_extent("a polygon mask", height, width, max_pixels, None)
    try:
        polys = [list(map(float, p)) for p in polygons]
    except (TypeError, ValueError) as err:
        raise MedicalImageError(f"polygons must be lists of numbers ({err})", "bad_mask") from err
    if not polys or any(len(p) < 6 or len(p) % 2 for p in polys):
        raise MedicalImageError("each polygon needs at least 3 (x, y) points as a flat list", "bad_mask")
    if not all(np.isfinite(p).all() for p in polys):
        raise MedicalImageError("polygon coordinates must be finite numbers", "bad_mask")
    _check_polygon_extent(polys, height, width)
    rles = mask_utils.frPyObjects(polys, height, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 copy= notice
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def read_mask(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read a mask reference as a boolean ``[H, W]`` array (non-zero, or ``== label`` when a label is named).

    ``size`` is ``(width, height)`` of the image: polygons without their own ``size`` take it, and an inline
    mask (RLE or polygons) of another size is refused before it is decoded. Mask files over ``max_pixels``
    pixels are refused from their headers.
    """
    if isinstance(ref, Mapping) and "counts" in ref:
        return rle_to_mask(ref, max_pixels, size)
    if isinstance(ref, Mapping) and "polygons" in ref:
        if "size" in ref:
            height, width = _mask_size(ref["size"], "a polygon mask")
            _check_extent("a polygon mask", height, width, max_pixels, size)
        elif size is not None:
            width, height = size
        else:
            raise MedicalImageError("a polygon mask needs 'size' [h, w] (or the image size)", "bad_mask")
        return polygons_to_mask(ref["polygons"], height, width, max_pixels)
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    if parsed.kind == "nifti":
        volume = read_nifti(parsed.path, parsed.t, max_pixels)
        plane = volume.slice(parsed.slice, 2 if parsed.axis is None else parsed.axis)
        return np.isin(plane, parsed.label) if parsed.label is not None else plane > 0
    if parsed.kind == "dicom":
        values = read_dicom(parsed.path, parsed.frame, max_pixels).values
        if values.ndim == 3:  # a colour file: any channel counts, as for raster masks
            values = values.max(axis=-1)
        return np.isin(values, parsed.label) if parsed.label is not None else values > 0
    opened = open_raster(parsed.path, max_pixels)
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


def _check_extent(
    what: str, height: int, width: int, max_pixels: int | None, image_size: tuple[int, int] | None
) -> None:
    """Refuse an inline mask over ``max_pixels`` pixels, or of another size than its image ``(width, height)``,
    before it is decoded."""
    if image_size is not None and (width, height) != tuple(image_size):
        raise MedicalImageError(
            f"{what} of size [{height}, {width}] (h, w) for an image of {image_size[0]}x{image_size[1]}: a mask "
            "must have its image's size",
            "mask_size",
        )
    check_pixels(what, height * width, max_pixels)


def _check_polygon_extent(polygons: list[list[float]], height: int, width: int) -> None:
    """Every point on the ``width`` x ``height`` image (within :data:`POLYGON_TOLERANCE`), and the outlines
    no longer than the image's area allows."""
    length = 0.0
    for k, polygon in enumerate(polygons):
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        outside = (
            (points[:, 0] < -POLYGON_TOLERANCE)
            | (points[:, 0] > width + POLYGON_TOLERANCE)
            | (points[:, 1] < -POLYGON_TOLERANCE)
            | (points[:, 1] > height + POLYGON_TOLERANCE)
        )
        if outside.any():
            x, y = points[int(np.argmax(outside))]
            raise MedicalImageError(
                f"polygon {k} has the point ({x:g}, {y:g}) outside the {width}x{height} image: polygon "
                "coordinates are pixels of the image",
                "bad_mask",
            )
        steps = np.abs(np.diff(np.vstack([points, points[:1]]), axis=0)).max(axis=1)
        length += float(steps.sum())
    # an outline that visits every pixel of the image is about h*w long; beyond twice that is not a mask outline
    limit = 2 * height * width + 4 * (height + width)
    if length > limit:
        raise MedicalImageError(
            f"the polygons' outlines are {length:.0f} pixels long, more than a {width}x{height} image can hold "
            f"({limit}). Fix: simplify the polygons",
            "bad_mask",
        )
