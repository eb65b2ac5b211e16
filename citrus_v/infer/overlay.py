"""Draw a prediction on its image: one colour per mask (filled, outlined, numbered), boxes, and a legend.

Used by ``citrus-v infer`` and the web app, so both show results the same way. Masks and boxes must be in
the image's own pixels (as :class:`~citrus_v.infer.results.Prediction` and the API's ``grounding`` give them).

With ``side`` (:data:`OVERLAY_SIDE` for a picture saved to disk), a small image (a 64-pixel MR slice) is
enlarged first by a whole factor with nearest-neighbour pixels, so that outlines, numbers and the legend stay
readable and every source pixel stays a sharp square; masks and boxes are enlarged with it. Callers that
enlarge the picture themselves (the web app's viewer) leave ``side`` out. A mask's number sits beside the mask
(above, below, left or right, wherever it covers no mask pixel), not on it, so a small mask stays visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct colours that stay apart on grey scans (Trubetskoy's list of 20 simple distinct colours, first 10).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (255, 225, 25),
    (0, 128, 128),
)
# An image whose longer side is at most half this is enlarged by the whole factor that brings it closest to it.
OVERLAY_SIDE = 512


class MaskLike(Protocol):
    mask: np.ndarray
    score: float
    label: str | None


class BoxLike(Protocol):
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None


def colour(index: int) -> tuple[int, int, int]:
    """The ``index``-th colour of the palette (cycling)."""
    return PALETTE[index % len(PALETTE)]


@lru_cache(maxsize=8)
def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def overlay_factor(width: int, height: int, side: int | None = OVERLAY_SIDE) -> int:
    """The whole enlargement factor for an image of ``width × height`` (1: drawn at its own size)."""
    if not side:
        return 1
    return max(1, int(side) // max(int(width), int(height), 1))


def _tag_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left + 4, bottom - top + 4


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font) -> None:
    """A label in a filled box whose top-left corner is ``xy``."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    width, height = _tag_size(draw, text, font)
    x, y = xy
    draw.rectangle([x, y, x + width, y + height], fill=fill)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def _inside(x: float, y: float, size: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    return (int(min(max(x, 0), max(bounds[0] - size[0], 0))), int(min(max(y, 0), max(bounds[1] - size[1], 0))))


def _chip_place(mask: np.ndarray, covered: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Where a ``size`` chip naming ``mask`` goes: beside it, covering as little of it (then of ``covered``, every
    mask) as the image allows; above the mask's top-left corner when that is free."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    w, h = size
    gap = 2
    candidates = [(x0, y0 - h - gap), (x0, y1 + gap), (x0 - w - gap, y0), (x1 + gap, y0), (x1 - w, y0 - h - gap),
                  (x1 - w, y1 + gap)]
    best, best_cost = None, None
    for order, (x, y) in enumerate(candidates):
        cx, cy = _inside(x, y, size, (width, height))
        window = (slice(cy, cy + h + 1), slice(cx, cx + w + 1))
        cost = (int(mask[window].sum()), int(covered[window].sum()), order)
        if best_cost is None or cost < best_cost:
            best, best_cost = (cx, cy), cost
    return best


def _mask_name(index: int, mask: MaskLike) -> str:
    label = mask.label or "mask"
    return f"{index + 1}. {label} (SAM 2 predicted IoU {float(mask.score):.2f})"


def _box_name(index: int, box: BoxLike) -> str:
    return f"B{index + 1}. {box.label or 'box'}"


def draw_overlay(
    image: Image.Image | np.ndarray,
    masks: Sequence[MaskLike] = (),
    boxes: Sequence[BoxLike] = (),
    alpha: float = 0.45,
    legend: bool = True,
    side: int | None = None,
) -> Image.Image:
    """Return an RGB copy of ``image`` with ``masks`` and ``boxes`` drawn, and a legend strip below it.

    Masks get colours ``0..K-1`` of :data:`PALETTE`, boxes the colours after them; every mask and box is
    numbered on the image and named in the legend (label and SAM 2's predicted IoU for masks). An image whose
    longer side is at most ``side / 2`` is drawn :func:`overlay_factor` times larger (``side=None``: as it is).
    """
    base = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    width, height = base.size
    arrays = [np.asarray(item.mask, dtype=bool) for item in masks]
    for k, mask in enumerate(arrays):
        if mask.shape != (height, width):
            raise ValueError(f"mask {k} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    factor = overlay_factor(width, height, side)
    if factor > 1:
        base = base.resize((width * factor, height * factor), Image.Resampling.NEAREST)
        arrays = [m.repeat(factor, axis=0).repeat(factor, axis=1) for m in arrays]
        width, height = base.size
    out = paint_masks(base, arrays, alpha)
    draw = ImageDraw.Draw(out)
    font = label_font(max(10, min(width, height) // 28))
    covered = np.logical_or.reduce(arrays) if arrays else np.zeros((height, width), bool)
    for k, mask in enumerate(arrays):
        if mask.any():
            text = str(k + 1)
            _tag(draw, _chip_place(mask, covered, _tag_size(draw, text, font)), text, colour(k), font)
    line = max(1, round(min(width, height) / 150))
    for j, box in enumerate(boxes):
        tint = colour(len(masks) + j)
        xa, ya, xb, yb = (float(v) * factor for v in (box.x1, box.y1, box.x2, box.y2))
        x1, y1, x2, y2 = min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)  # corners in either order
        draw.rectangle([x1, y1, x2, y2], outline=tint, width=line + 1)
        size = _tag_size(draw, f"B{j + 1}", font)
        _tag(draw, _inside(x1, y1 - size[1], size, (width, height)), f"B{j + 1}", tint, font)
    if not legend or not (len(masks) or len(boxes)):
        return out
    return _with_legend(out, masks, boxes)


def paint_masks(base: Image.Image, masks: Sequence[np.ndarray], alpha: float) -> Image.Image:
    """``base`` with each mask tinted in its palette colour and outlined."""
    width, height = base.size
    pixels = np.asarray(base, dtype=np.float32).copy()
    line = max(1, round(min(width, height) / 150))
    for k, mask in enumerate(masks):
        tint = np.array(colour(k), dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * tint
        pixels[_outline(mask, line)] = tint
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _with_legend(image: Image.Image, masks: Sequence[MaskLike], boxes: Sequence[BoxLike]) -> Image.Image:
    width, height = image.size
    font = label_font(max(11, min(width, 900) // 40))
    entries = [(colour(k), _mask_name(k, m), True) for k, m in enumerate(masks)]
    entries += [(colour(len(masks) + j), _box_name(j, b), False) for j, b in enumerate(boxes)]
    probe = ImageDraw.Draw(image)
    row = max(probe.textbbox((0, 0), "Ag", font=font)[3] + 6, 14)
    # the strip is as wide as its longest entry: a small image gets a wider canvas, never cut-off names
    needed = max(int(probe.textlength(text, font=font)) for _, text, _ in entries) + row + 14
    width = max(width, needed)
    strip = Image.new("RGB", (width, row * len(entries) + 8), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    for k, (tint, text, filled) in enumerate(entries):
        top = 4 + k * row
        swatch = [6, top + 2, 6 + row - 6, top + row - 4]
        draw.rectangle(swatch, fill=tint if filled else None, outline=tint, width=2)
        draw.text((row + 6, top + 1), text, fill=(235, 235, 235), font=font)
    combined = Image.new("RGB", (width, height + strip.height), (24, 24, 24))
    combined.paste(image, (0, 0))
    combined.paste(strip, (0, height))
    return combined
