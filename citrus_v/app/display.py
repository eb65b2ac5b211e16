"""The pictures the viewer shows: small scans enlarged by whole factors with nearest-neighbour pixels (so a
64-pixel MR frame fills the viewer with sharp, countable pixels), and the masks and boxes drawn on that enlarged
picture with :func:`citrus_v.infer.overlay.draw_overlay`, so numbers and outlines stay readable on small scans.

Where the pixel spacing is known and rows and columns differ (a coronal slice of a volume with thick slices),
rows and columns get different factors, so that the picture has the patient's proportions. Only the display is
enlarged: the server gets the picture at its own resolution, and measurements use the masks as the server
returned them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from ..infer.overlay import draw_overlay
from ..infer.results import MaskResult
from ..media import Box
from .measurements import PixelSpacing

DISPLAY_SIDE = 768  # small pictures are enlarged until their longer side is about this many pixels
MAX_FACTOR = 16


def display_factors(
    width: int, height: int, spacing: PixelSpacing | None = None, side: int = DISPLAY_SIDE, max_factor: int = MAX_FACTOR
) -> tuple[int, int]:
    """Whole-number enlargements ``(columns, rows)`` that bring the longer side close to ``side`` (1 for large
    pictures) and, with a pixel ``spacing``, make a pixel as tall against its width as it is in the patient."""
    aspect = spacing.row_mm / spacing.col_mm if spacing is not None else 1.0  # a pixel's height over its width
    width, height = max(int(width), 1), max(int(height), 1)
    if aspect >= 1.0:
        fx = max(1, min(max_factor, int(side // max(width, height * aspect))))
        return fx, max(1, min(max_factor, round(fx * aspect)))
    fy = max(1, min(max_factor, int(side // max(width / aspect, height))))
    return max(1, min(max_factor, round(fy / aspect))), fy


def enlarge(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """``image`` enlarged ``(columns, rows)`` times, each pixel a block (nearest neighbour)."""
    fx, fy = factors
    if (fx, fy) == (1, 1):
        return image
    return image.resize((image.width * fx, image.height * fy), Image.Resampling.NEAREST)


def enlarge_mask(mask: np.ndarray, factors: tuple[int, int]) -> np.ndarray:
    """A boolean mask enlarged the same way as :func:`enlarge`."""
    fx, fy = factors
    mask = np.asarray(mask, dtype=bool)
    return mask if (fx, fy) == (1, 1) else mask.repeat(fy, axis=0).repeat(fx, axis=1)


def display_overlay(
    image: Image.Image, masks: Sequence[MaskResult], boxes: Sequence[Box], factors: tuple[int, int]
) -> Image.Image:
    """The enlarged picture with the masks (palette colours ``0..K-1``, numbered) and the boxes drawn on it.

    The legend is not drawn into the picture: the page lists it next to the answer, with the measurements.
    """
    fx, fy = factors
    big_masks = [replace(m, mask=enlarge_mask(m.mask, factors)) for m in masks]
    big_boxes = [Box(b.x1 * fx, b.y1 * fy, b.x2 * fx, b.y2 * fy, b.label) for b in boxes]
    return draw_overlay(enlarge(image, factors), big_masks, big_boxes, legend=False)
