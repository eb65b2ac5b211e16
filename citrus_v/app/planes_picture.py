"""A whole-volume answer at a glance: for a volume, the three orthogonal planes through each present mask (one row
per mask, oriented and scaled by the spacing as ``citrus-v infer`` draws them:
:func:`citrus_v.infer.volume_pictures.plane_panels`); for a clip, a strip of its frames with mask
(:func:`~citrus_v.infer.volume_pictures.strip_panels`). Below, one line per target: present ones on a swatch of
their colour with the server's volume, absent ones in words and without colour.

Every target keeps its position, so mask ``k`` has the colour its chip, legend row and overlay have.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..infer.overlay import colour
from ..infer.volume_pictures import STRIP_COLUMNS, Panel, compose, plane_panels, strip_frames, strip_panels
from ..media import Volume
from ..media.windowing import Window
from .volume_answer import VolumeAnswer, VolumeTarget
from .volume_legend import NOT_PRESENT, ml_text


def answer_picture(volume: Volume, answer: VolumeAnswer, window: str | Window | None = None) -> Image.Image | None:
    """The planes (a volume) or the strip (a clip) of ``answer`` over ``volume``; ``None`` when no target is
    present."""
    present = [k for k, t in enumerate(answer.targets) if t.present]
    if not present:
        return None
    stacks = answer.stacks()
    if volume.kind == "clip":
        panels = strip_panels(volume, stacks, strip_frames(stacks, volume.num_frames), window)
        rows = [panels[k : k + STRIP_COLUMNS] for k in range(0, len(panels), STRIP_COLUMNS)]
    else:
        rows = [_slider_caption(plane_panels(volume, stacks, mask_centre(stacks[k]), window)) for k in present]
    lines = [_line(k, t, volume.kind == "clip") for k, t in enumerate(answer.targets)]
    return compose(rows, lines)


def mask_centre(stack: np.ndarray) -> tuple[int, int, int]:
    """The mask voxel nearest the mask's centroid (``(frame, row, column)``), so that a hollow or split mask is
    still cut through mask."""
    points = np.argwhere(stack)
    mean = points.mean(axis=0)
    nearest = points[np.argmin(((points - mean) ** 2).sum(axis=1))]
    return int(nearest[0]), int(nearest[1]), int(nearest[2])


def _slider_caption(panels: list[Panel]) -> list[Panel]:
    """The frame plane captioned with its slider number (1-based), as the page's slider and legend count."""
    first = panels[0]
    name, _, where = first.caption.rpartition(" (")
    frame = int(where.rstrip(")").split()[-1]) if where else int(first.caption.split()[-1])
    first.caption = f"{name or 'frame plane'}, slice {frame + 1}"
    return panels


def _line(position: int, target: VolumeTarget, clip: bool) -> tuple[str, tuple[int, int, int] | None]:
    """A legend line and its swatch colour (``None``: an absent target, drawn without colour)."""
    name = f"{position + 1}. {target.label or 'mask'}"
    if not target.present:
        return f"{name}: {NOT_PRESENT}", None
    numbers = target.frame_numbers
    noun = "frames" if clip else "slices"
    return f"{name}: {ml_text(target.volume_ml, clip)}, {noun} {numbers[0] + 1}-{numbers[-1] + 1}", colour(position)


