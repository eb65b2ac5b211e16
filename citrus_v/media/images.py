"""Any image reference to an 8-bit RGB picture, or to its size: dispatch by format (DICOM, NIfTI, raster)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from .dicom import dicom_size, read_dicom
from .errors import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_IMAGE_PIXELS, check_pixels, require_file
from .nifti import nifti_display_size, read_nifti
from .raster import raster_size, read_raster
from .refs import MediaRef, parse_ref
from .windowing import Window, apply_window, full_range_window, parse_window


def read_image(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    window: str | Window | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Read any supported image reference as an 8-bit RGB PIL image.

    ``window`` applies when the reference names none (``"file"``/None: the file's own window or full range).
    Before anything is decoded, the header is checked: the picture against ``max_pixels``, the whole container
    (every frame, every voxel) against ``max_bytes``.
    """
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    chosen = parsed.window if parsed.window is not None else window
    kind = parsed.kind
    if kind == "dicom":
        return Image.fromarray(
            read_dicom(parsed.path, parsed.frame, max_pixels, max_bytes).to_uint8(chosen)
        ).convert("RGB")
    if kind == "nifti":
        volume = read_nifti(parsed.path, parsed.t, max_pixels, max_bytes)
        axis = 2 if parsed.axis is None else parsed.axis
        plane = volume.slice(parsed.slice, axis)
        check_pixels(parsed.path, plane.size, max_pixels)
        # one window for the whole volume, so that every slice of a series looks alike
        return Image.fromarray(apply_window(plane, parse_window(chosen) or full_range_window(volume.data))).convert(
            "RGB"
        )
    return read_raster(parsed.path, chosen, max_pixels, max_bytes)


def image_size(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[int, int]:
    """``(width, height)`` of an image reference from its header only (no pixel decoding), with the same checks
    as :func:`read_image`: a file refused there is refused here."""
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    require_file(parsed.path)
    kind = parsed.kind
    if kind == "dicom":
        return dicom_size(parsed.path, max_pixels, max_bytes)
    if kind == "nifti":
        return nifti_display_size(parsed.path, parsed.axis, max_pixels, max_bytes)
    return raster_size(parsed.path, max_pixels, max_bytes)
