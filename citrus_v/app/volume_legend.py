"""The legend of a whole-volume answer: one row per ``[SEG]`` target with its colour and number (as on the
overlay and the answer's chip), its label, its volume in millilitres as the server measured it, the slices (or
frames) it is on, its 3-D box, its key frame, and its area on the picture shown; a target the server found on no
frame gets the line "not present in this volume" and no colour.

Slice and frame numbers are the slider's (1-based); the server's frame indices are 0-based.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ..infer.overlay import colour
from .legend import spacing_line, swatch_html
from .measurements import MaskMeasurement, PixelSpacing
from .volume_answer import VolumeAnswer, VolumeTarget

NOT_PRESENT = "not present in this volume"


def ml_text(value: float | None, clip: bool) -> str:
    """The volume in mL as the legend writes it (a clip's frames are moments, so it has none)."""
    if value is None:
        return "— (a clip: no volume)" if clip else "— (no voxel spacing)"
    return f"{value:,.2f} mL" if abs(value) >= 0.1 else f"{value:.2g} mL"


def frames_text(target: VolumeTarget, noun: str) -> str:
    """``slices 12–15 (4)``: where the target is, in slider numbers."""
    numbers = target.frame_numbers
    if not numbers:
        return "—"
    span = f"{numbers[0] + 1}" if len(numbers) == 1 else f"{numbers[0] + 1}–{numbers[-1] + 1}"
    return f"{noun} {span} ({len(numbers)})"


def bbox3d_text(bbox: Any, noun: str) -> str:
    """The server's 3-D box (half-open ``frames``/``rows``/``columns`` ranges, ``size_mm``) in words."""
    if not isinstance(bbox, Mapping):
        return "—" if bbox is None else html.escape(str(bbox))
    parts = []
    for key, name, offset in (("frames", noun, 1), ("rows", "rows", 0), ("columns", "columns", 0)):
        span = bbox.get(key)
        if isinstance(span, Sequence) and len(span) == 2:
            parts.append(f"{name} {int(span[0]) + offset}–{int(span[1]) - 1 + offset}")
    text = ", ".join(parts) or "—"
    size = bbox.get("size_mm")
    if isinstance(size, Sequence) and size and all(v is not None for v in size):
        text += " (" + " × ".join(f"{float(v):g}" for v in size) + " mm)"
    return text


def _area_text(measured: MaskMeasurement | None) -> str:
    if measured is None or measured.empty:
        return "—"
    area = f"{measured.area_px:,} px"
    return area if measured.area_mm2 is None else f"{area} ({measured.area_mm2:,.1f} mm²)"


def _row(position: int, target: VolumeTarget, measured: MaskMeasurement | None, noun: str, clip: bool) -> str:
    number = str(position + 1)
    label = html.escape(target.label or "mask")
    if not target.present:
        return (
            f'<tr class="legend-mask legend-absent" data-mask="{number}"><td>{html.escape(number)}</td>'
            f'<td>{label}</td><td colspan="5" class="legend-not-present">{NOT_PRESENT}</td></tr>'
        )
    key = "—" if target.key_frame is None else str(target.key_frame + 1)
    return (
        f'<tr class="legend-mask" data-mask="{number}"><td>{swatch_html(number, colour(position))}</td>'
        f'<td>{label}</td><td class="legend-volume">{html.escape(ml_text(target.volume_ml, clip))}</td>'
        f"<td>{html.escape(frames_text(target, noun))}</td><td>{html.escape(bbox3d_text(target.bbox3d, noun))}</td>"
        f"<td>{html.escape(key)}</td><td>{html.escape(_area_text(measured))}</td></tr>"
    )


def volume_legend_html(
    answer: VolumeAnswer,
    on_picture: Sequence[MaskMeasurement],
    spacing: PixelSpacing | None,
    noun: str = "slices",
    clip: bool = False,
) -> str:
    """The legend table of a whole-volume answer; ``on_picture`` measures each target's mask on the picture shown
    (in target order), ``noun`` names the frames (``slices``, ``axial slices``, ``frames``)."""
    if not answer.targets:
        return ""
    rows = [
        _row(k, target, on_picture[k] if k < len(on_picture) else None, noun, clip)
        for k, target in enumerate(answer.targets)
    ]
    header = (
        "<tr><th></th><th>label</th><th>volume</th><th>on</th><th>3-D box</th><th>key frame</th>"
        "<th>on this picture</th></tr>"
    )
    voxel = next((t.spacing for t in answer.targets if t.spacing), None)
    note = (
        "Volumes as the server measured them from the voxel spacing"
        + (f" ({' × '.join(f'{s:g}' for s in voxel)} mm between frames × rows × columns)" if voxel else "")
        + f"; key frame: where SAM 2 was most certain. {spacing_line(spacing)}"
    )
    return f'<table class="legend legend-volume-table">{header}{"".join(rows)}</table><p class="legend-note">' + (
        f"{html.escape(note)}</p>"
    )
