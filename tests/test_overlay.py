"""Overlays of small images: enlarged with sharp pixels, and each mask's number beside the mask, not on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from citrus_v.infer.overlay import OVERLAY_SIDE, colour, draw_overlay, overlay_factor


@dataclass
class _Mask:
    mask: np.ndarray
    score: float = 0.9
    label: str | None = "lesion"


@dataclass
class _Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = "nodule"


def _scan(width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(40, 200, (height, width), dtype=np.uint8)


def test_small_image_is_enlarged_with_nearest_neighbour_pixels():
    scan = _scan()
    factor = overlay_factor(64, 48)
    assert factor == OVERLAY_SIDE // 64 == 8
    box = _Box(50, 40, 40, 30)  # corners in either order
    out = np.asarray(draw_overlay(Image.fromarray(scan), boxes=[box], legend=False, side=OVERLAY_SIDE))
    assert out.shape == (48 * factor, 64 * factor, 3)
    # away from the box, every source pixel is a sharp factor x factor block of its own grey value
    block = out[8 * factor : 9 * factor, 5 * factor : 6 * factor]
    assert (block == scan[8, 5]).all()
    assert (out[30 * factor, 41 * factor : 49 * factor] == colour(0)).all()  # the box's top edge, enlarged
    # a large image is drawn at its own size
    assert draw_overlay(Image.fromarray(_scan(600, 400)), legend=False, side=OVERLAY_SIDE).size == (600, 400)
    assert draw_overlay(Image.fromarray(scan), legend=False).size == (64, 48)  # callers that enlarge themselves
    assert overlay_factor(64, 48, side=None) == 1


def test_number_chip_sits_beside_a_small_mask_not_on_it():
    scan = np.full((48, 64), 100, np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[1:5, 2:6] = True  # 4x4 pixels in the top-left corner: the old chip spot (above it) is off the image
    out = np.asarray(draw_overlay(Image.fromarray(scan), [_Mask(mask)], legend=False, side=OVERLAY_SIDE)).astype(int)
    factor = overlay_factor(64, 48)
    big = mask.repeat(factor, 0).repeat(factor, 1)
    tint = np.array(colour(0))
    blended = np.floor(0.55 * 100 + 0.45 * tint + 0.5)
    # every mask pixel is either its outline (the pure colour) or its tint over the scan: no chip, no digits on it
    on_mask = out[big]
    outline = (on_mask == tint).all(axis=1)
    tinted = (on_mask == blended).all(axis=1)
    assert (outline | tinted).all() and tinted.sum() > big.sum() / 2
    # the chip (filled with the mask's colour) is beside the mask, within a few chip sizes of it
    chip = (out == tint).all(axis=2) & ~big
    ys, xs = np.nonzero(chip)
    assert len(ys) > 100
    assert ys.min() >= 0 and xs.max() < 6 * factor + 60 and ys.max() < 5 * factor + 60
