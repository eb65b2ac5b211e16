"""Raster images: PNG / JPEG / TIFF and anything else Pillow opens.

16-bit and float images are scaled to 8 bits by a window (explicit, else their own min/max).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DEFAULT_MAX_IMAGE_PIXELS, MedicalImageError, check_pixels
from .windowing import Window, apply_window, full_range_window, parse_window


def open_raster(path: Path, max_pixels: int | None) -> Image.Image:
    """Open (not decode) a raster file, refusing one of more than ``max_pixels`` pixels."""
    if not path.is_file():
        raise MedicalImageError(f"image file not found: {path}", "missing_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            opened = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MedicalImageError(f"{path}: {err}", "image_too_large") from err
    except OSError as err:
        raise MedicalImageError(f"{path}: not a readable image ({err})", "unreadable_image") from err
    width, height = opened.size
    check_pixels(path, width * height, max_pixels)
    return opened


def read_raster(path: str | Path, window: str | Window | None = None, max_pixels: int | None = None) -> Image.Image:
    """PNG / JPEG / TIFF to RGB; 16-bit or float images go through ``window`` (default: their min/max)."""
    path = Path(path)
    opened = open_raster(path, DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
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


def raster_size(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the file header (no pixel decoding)."""
    with open_raster(path, max_pixels) as opened:
        return opened.size


def _gray_to_pil(array: np.ndarray, window: Window | None) -> Image.Image:
    if array.dtype == np.uint8 and window is None:
        return Image.fromarray(array).convert("RGB")
    pixels = apply_window(array, window or full_range_window(array))
    return Image.fromarray(pixels).convert("RGB")
