"""Raster images: PNG / JPEG / TIFF and anything else Pillow opens.

16-bit and float images are scaled to 8 bits by a window (explicit, else their own min/max). Only the first
frame of a multi-frame file (an animated PNG, GIF or WebP, a multi-page TIFF) is decoded. Before it is, the
header is checked: the frame's pixels against the pixel limit, every frame's decoded bytes against the byte
budget, and the number of pieces (strips, tiles) the frame is decoded in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MedicalImageError,
    check_decoded_bytes,
    check_pixels,
    require_file,
)
from .windowing import Window, apply_window, full_range_window, parse_window

# A frame is decoded in pieces (strips, tiles); more pieces than this many per pixel is a crafted file.
_MIN_PIXELS_PER_PIECE = 16


def open_raster(
    path: Path, max_pixels: int | None, max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
) -> Image.Image:
    """Open (not decode) a raster file, once its header passes :func:`check_raster`."""
    require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            opened = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MedicalImageError(f"{path}: {err}", "image_too_large") from err
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's parsers raise these for broken headers
        raise MedicalImageError(f"{path}: not a readable image ({err})", "unreadable_image") from err
    try:
        check_raster(opened, path, max_pixels, max_bytes)
    except BaseException:
        opened.close()
        raise
    return opened


def check_raster(image: Image.Image, source: Path | str, max_pixels: int | None, max_bytes: int | None) -> None:
    """Check an opened (not decoded) image from its header: its first frame's pixels against ``max_pixels``,
    every frame's decoded bytes against ``max_bytes``, and the pieces its first frame is decoded in."""
    width, height = image.size
    check_pixels(source, width * height, max_pixels)
    try:
        frames = int(getattr(image, "n_frames", 1))  # what the header says, or a walk over the frame headers
        image.seek(0)
    except Exception as err:  # Pillow raises varied types for a broken frame table
        raise MedicalImageError(f"{source}: the image's frames cannot be read ({err})", "unreadable_image") from err
    per_pixel = _bytes_per_pixel(image.mode)
    what = f"{frames} frame(s) of {width} x {height} pixels in mode {image.mode}"
    check_decoded_bytes(source, frames * width * height * per_pixel, max_bytes, what)
    pieces = len(getattr(image, "tile", None) or ())
    if pieces > max(64, width * height // _MIN_PIXELS_PER_PIECE):
        raise MedicalImageError(
            f"{source}: the {width} x {height} image is stored in {pieces} pieces (strips or tiles), more than one "
            f"per {_MIN_PIXELS_PER_PIECE} pixels; refused before decoding. Fix: re-save the image",
            "unreadable_image",
        )


def _bytes_per_pixel(mode: str) -> int:
    """The bytes one decoded pixel of Pillow's ``mode`` takes (at least one)."""
    from PIL import ImageMode

    try:
        descriptor = ImageMode.getmode(mode)
        return max(1, len(descriptor.bands) * np.dtype(descriptor.typestr).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4  # an unusual mode: counted as the widest common pixel


def read_raster(
    path: str | Path,
    window: str | Window | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """PNG / JPEG / TIFF to RGB; 16-bit or float images go through ``window`` (default: their min/max). Only the
    first frame of a multi-frame file is decoded."""
    path = Path(path)
    opened = open_raster(path, DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, max_bytes)
    try:
        with opened:
            opened.load()
            if opened.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _gray_to_pil(np.asarray(opened), parse_window(window))
            if window is not None and opened.mode == "L":
                return _gray_to_pil(np.asarray(opened).astype(np.float64), parse_window(window))
            return opened.convert("RGB")
    except OSError as err:
        raise MedicalImageError(
            f"{path}: truncated or corrupt image data ({err}). Fix: re-export the file", "truncated_image"
        ) from err


def raster_size(
    path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
) -> tuple[int, int]:
    """``(width, height)`` from the file header (no pixel decoding), with the checks of :func:`read_raster`."""
    with open_raster(path, max_pixels, max_bytes) as opened:
        return opened.size


def _gray_to_pil(array: np.ndarray, window: Window | None) -> Image.Image:
    if array.dtype == np.uint8 and window is None:
        return Image.fromarray(array).convert("RGB")
    pixels = apply_window(array, window or full_range_window(array))
    return Image.fromarray(pixels).convert("RGB")
