"""Draw a prediction on its image: one colour per mask (filled, outlined, numbered), boxes, and a legend.

Used by ``citrus-v infer`` and the web app, so both show results the same way. Masks and boxes must be in
the image's own pixels (as :class:`~citrus_v.infer.results.Prediction` and the API's ``grounding`` give them).
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
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font, bounds: tuple[int, int]) -> None:
    """A label in a filled box at ``xy`` (kept inside the image)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(xy[0], 0), max(bounds[0] - width, 0))
    y = min(max(xy[1] - height, 0), max(bounds[1] - height, 0))
    draw.rectangle([x, y, x + width, y + height], fill=fill)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def _mask_name(index: int, mask: MaskLike) -> str:
    label = mask.label or "mask"
    return f"{index + 1}. {label} (IoU {float(mask.score):.2f})"


def _box_name(index: int, box: BoxLike) -> str:
    return f"B{index + 1}. {box.label or 'box'}"


def draw_overlay(
    image: Image.Image | np.ndarray,
    masks: Sequence[MaskLike] = (),
    boxes: Sequence[BoxLike] = (),
    alpha: float = 0.45,
    legend: bool = True,
) -> Image.Image:
    """Return an RGB copy of ``image`` with ``masks`` and ``boxes`` drawn, and a legend strip below it.

    Masks get colours ``0..K-1`` of :data:`PALETTE`, boxes the colours after them; every mask and box is
    numbered on the image and named in the legend (label and predicted IoU for masks).
    """
    base = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    width, height = base.size
    pixels = np.asarray(base, dtype=np.float32).copy()
    line = max(1, round(min(width, height) / 150))
    for k, item in enumerate(masks):
        mask = np.asarray(item.mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"mask {k} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
        tint = np.array(colour(k), dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * tint
        pixels[_outline(mask, line)] = tint
    out = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(width, height) // 28))
    for k, item in enumerate(masks):
        ys, xs = np.nonzero(np.asarray(item.mask, dtype=bool))
        if len(xs):
            _tag(draw, (float(xs.min()), float(ys.min())), str(k + 1), colour(k), font, (width, height))
    for j, box in enumerate(boxes):
        tint = colour(len(masks) + j)
        x1, y1, x2, y2 = (float(v) for v in (box.x1, box.y1, box.x2, box.y2))
        draw.rectangle([x1, y1, x2, y2], outline=tint, width=line + 1)
        _tag(draw, (x1, y1), f"B{j + 1}", tint, font, (width, height))
    if not legend or not (len(masks) or len(boxes)):
        return out
    return _with_legend(out, masks, boxes)


def _with_legend(image: Image.Image, masks: Sequence[MaskLike], boxes: Sequence[BoxLike]) -> Image.Image:
    width, height = image.size
    font = _font(max(11, min(width, 900) // 40))
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
