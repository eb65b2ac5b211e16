"""The legend next to the answer: one row per mask (its colour and number as on the overlay and the answer's chip,
its label, SAM 2's predicted IoU, its area and box) and per box, and where the pixel spacing came from."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..infer.overlay import colour
from ..media import Box
from .answer_chips import text_colour
from .measurements import MaskMeasurement, PixelSpacing

SCORE_NAME = "SAM 2 predicted IoU"
SCORE_HELP = "SAM 2's own estimate of how well its mask fits, not an overlap measured against a reference"


def swatch_html(text: str, fill: tuple[int, int, int], filled: bool = True) -> str:
    """A legend swatch with the number the overlay draws (``data-swatch`` holds it)."""
    r, g, b = fill
    style = (
        f"background-color: rgb({r}, {g}, {b}); color: {text_colour(fill)}"
        if filled
        else f"border: 2px solid rgb({r}, {g}, {b})"
    )
    return (
        f'<span class="legend-swatch" data-swatch="{html.escape(text)}" style="{style}; border-radius: 0.3em; '
        f'padding: 0 0.45em; font-weight: 600">{html.escape(text)}</span>'
    )


def _area_text(item: MaskMeasurement) -> str:
    area = f"{item.area_px:,} px"
    return area if item.area_mm2 is None else f"{area} ({item.area_mm2:,.1f} mm²)"


def _bbox_text(bbox: tuple[float, float, float, float] | None) -> str:
    if bbox is None:
        return "—"
    x1, y1, x2, y2 = bbox
    return f"x {x1:g}–{x2:g}, y {y1:g}–{y2:g} ({x2 - x1:g} × {y2 - y1:g} px)"


def spacing_line(spacing: PixelSpacing | None) -> str:
    """Where the mm² come from, or why there are none."""
    if spacing is None:
        return "Pixel spacing unknown (the file states none, or an unusable one): areas in pixels only."
    return f"Pixel spacing {spacing.row_mm:g} × {spacing.col_mm:g} mm (rows × columns), from {spacing.source}."


def legend_html(masks: Sequence[MaskMeasurement], boxes: Sequence[Box], spacing: PixelSpacing | None) -> str:
    """The legend table; empty when the answer has neither masks nor boxes."""
    if not masks and not boxes:
        return ""
    rows = []
    for item in masks:
        rows.append(
            f'<tr class="legend-mask"><td>{swatch_html(str(item.number), colour(item.number - 1))}</td>'
            f"<td>{html.escape(item.label or 'mask')}</td><td>{item.score:.2f}</td>"
            f"<td>{_area_text(item)}</td><td>{_bbox_text(item.bbox)}</td></tr>"
        )
    for j, box in enumerate(boxes):
        bbox = (float(box.x1), float(box.y1), float(box.x2), float(box.y2))
        rows.append(
            f'<tr class="legend-box"><td>{swatch_html(f"B{j + 1}", colour(len(masks) + j), filled=False)}</td>'
            f"<td>{html.escape(box.label or 'box')}</td><td>—</td><td>—</td><td>{_bbox_text(bbox)}</td></tr>"
        )
    header = (
        f'<tr><th></th><th>label</th><th title="{html.escape(SCORE_HELP)}">{SCORE_NAME}</th>'
        "<th>area</th><th>bounding box</th></tr>"
    )
    return (
        f'<table class="legend">{header}{"".join(rows)}</table>'
        f'<p class="legend-note">{html.escape(spacing_line(spacing))} {SCORE_NAME}: {html.escape(SCORE_HELP)}.</p>'
    )
