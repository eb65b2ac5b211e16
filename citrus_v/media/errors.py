"""What every reader shares: the error type and the pixel limit that guards against decompression bombs."""

from __future__ import annotations

from pathlib import Path

# Larger than any single radiograph or CT slice; a file claiming more pixels is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 2**27


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
