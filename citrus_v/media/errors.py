"""What every reader shares: the error type, the limits that guard against decompression bombs, and the path probe.

Two limits apply before anything is decoded: ``max_pixels`` for one picture (a frame, a slice) and
``max_bytes`` for a whole decoded container (every voxel of a NIfTI volume in every dimension, every frame of a
DICOM file or a multi-page image), both read from the file's header.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# Larger than any single radiograph or CT slice; a file claiming more pixels is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 2**27
# A whole decoded container: room for a 512 x 512 x 1000 CT of 16-bit values; more is treated as a bomb.
DEFAULT_MAX_DECODED_BYTES = 2**29

_PATH_FIX = "Fix: check the path (each name at most 255 bytes, no NUL byte, no symbolic-link loop)"


class MedicalImageError(ValueError):
    """An image or mask that cannot be read; ``reason`` is a short key used to count skipped rows."""

    def __init__(self, message: str, reason: str = "unreadable_image") -> None:
        super().__init__(message)
        self.reason = reason


def check_pixels(path: Path | str, pixels: int, max_pixels: int | None) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (``None``: no limit), before its pixels are decoded.

    ``path`` names the image in the message: a file, or where bytes came from ("the data: URL").
    """
    if max_pixels is not None and pixels > max_pixels:
        raise MedicalImageError(
            f"{path}: {pixels} pixels is over the limit of {max_pixels} (a decompression bomb or a huge image). "
            "Fix: downsample the image, or raise the limit (--max_image_pixels)",
            "image_too_large",
        )


def check_decoded_bytes(path: Path | str, nbytes: int, max_bytes: int | None, what: str) -> None:
    """Refuse a container whose decoded size, ``nbytes`` as its header declares it, is over ``max_bytes``
    (``None``: no limit); ``what`` says how the size was counted (e.g. "512 x 512 x 400 voxels of int16")."""
    if max_bytes is not None and nbytes > max_bytes:
        raise MedicalImageError(
            f"{path}: {what} decode to {nbytes} bytes, over the limit of {max_bytes} bytes for one image or "
            "volume (a decompression bomb or a huge file). Fix: send a smaller or cropped image, or raise the "
            "limit (--max_decoded_bytes)",
            "image_too_large",
        )


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` names a regular file (symbolic links followed); ``False`` when nothing is there.

    A path the system cannot even look up (a name over 255 bytes, a NUL byte, a symbolic-link loop, no permission
    on a folder) is a :class:`MedicalImageError` naming the path and the fix, not an ``OSError``.
    """
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as err:
        raise path_error(path, err) from err


def require_file(path: Path) -> None:
    """Refuse a path that names no regular file (``missing_file``) or that the system cannot look up."""
    if not is_regular_file(path):
        raise MedicalImageError(f"image file not found: {path}", "missing_file")


def path_error(path: Path | str, err: Exception) -> MedicalImageError:
    """The :class:`MedicalImageError` for a path the system refused (``err`` an ``OSError`` or ``ValueError``)."""
    detail = getattr(err, "strerror", None) or str(err)
    return MedicalImageError(f"{path}: the file cannot be opened ({detail}). {_PATH_FIX}", "unreadable_image")
