"""Pictures of 3-D masks: a volume on three orthogonal planes through each mask's centre, a clip as a strip of
its frames with mask.

Masks are tinted and outlined in the 2-D overlay's colours (mask ``k`` in :func:`~citrus_v.infer.overlay.colour`
``(k)``), and a legend below names each one with its volume (or voxel count). A plane is scaled by the
volume's spacing, so that a volume of 5-mm slices is not squashed: every voxel becomes a whole number of
pixels or more, never fewer, so that no mask voxel is lost. With an affine, each plane is shown in the usual
radiological orientation (superior and anterior up, the patient's right on the image's left, anterior on the
left of a sagittal plane) and named for its orientation (axial, coronal, sagittal); without one, the planes
are the frame, a row and a column of the stack, frame 0 at the top.

numpy and Pillow only; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..media.volume import Volume
from ..media.windowing import Window, apply_window
from .overlay import colour, label_font, paint_masks
from .volume_masks import MaskInput, frame_step, mask_stacks, ras_affine, source_frames
from .volume_measures import measure_stack

# the longer side, in pixels, of the largest plane (a plane is never drawn below one pixel per voxel)
PLANE_SIDE = 384
# the longer side of one frame in a clip's strip, the most frames a strip shows, and how many per row
TILE_SIDE = 192
STRIP_FRAMES = 16
STRIP_COLUMNS = 4

_PLANE_NAMES = ("sagittal", "coronal", "axial")  # the plane perpendicular to RAS axis 0, 1, 2
_INDEX_AXES = ("frame", "row", "column")  # the stack's axes; the affine's columns are (column, row, frame)
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_GAP = 8
_ALPHA = 0.45


@dataclass
class Panel:
    """One picture of the strip or the planes: the pixels (masks painted), the masks at its size, a caption."""

    image: Image.Image
    masks: list[np.ndarray]  # boolean, at the picture's size
    caption: str


def volume_picture(
    volume: Volume, masks: MaskInput, labels: Sequence[str | None] | None = None, window: str | Window | None = None
) -> Image.Image:
    """The picture of ``masks`` over ``volume``: three planes per mask for a volume, a strip for a clip."""
    if volume.kind == "clip":
        return clip_strip(volume, masks, labels, window)
    return three_planes(volume, masks, labels, window)


def three_planes(
    volume: Volume,
    masks: MaskInput,
    labels: Sequence[str | None] | None = None,
    window: str | Window | None = None,
    side: int = PLANE_SIDE,
) -> Image.Image:
    """One row per mask that holds voxels: the three orthogonal planes through its centre, every mask drawn;
    one row through the volume's centre when no mask holds any."""
    stacks = mask_stacks(masks, volume.values.shape)
    rows = [plane_panels(volume, stacks, centre, window, side) for centre in _centres(volume, stacks)]
    return compose(rows, [(text, colour(k)) for k, text in enumerate(_legend_lines(volume, stacks, labels))])


def _centres(volume: Volume, stacks: list[np.ndarray]) -> list[tuple[int, int, int]]:
    """The voxel nearest each non-empty mask's centroid that lies in the mask; the volume's centre if none."""
    centres = []
    for stack in stacks:
        count = int(stack.sum())
        if not count:
            continue
        mean = [float((stack.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum()) / count
                for axis, n in enumerate(stack.shape)]
        centre = tuple(int(round(v)) for v in mean)
        if not stack[centre]:  # a hollow or split mask: the mask voxel nearest its centroid
            points = np.argwhere(stack)
            centre = tuple(int(v) for v in points[np.argmin(((points - np.asarray(mean)) ** 2).sum(axis=1))])
        centres.append(centre)
    return centres or [tuple(int(s) // 2 for s in volume.values.shape[:3])]


def plane_panels(
    volume: Volume,
    stacks: list[np.ndarray],
    centre: tuple[int, int, int],
    window: str | Window | None = None,
    side: int = PLANE_SIDE,
) -> list[Panel]:
    """The frame, row and column planes through ``centre`` (frame, row, column), oriented, scaled by the
    spacing (one scale for the three) and painted."""
    frame, row, column = centre
    cuts = (  # (index along the cut axis, the plane's two stack axes, the plane's values and masks)
        (0, frame, (1, 2), volume.values[frame], [s[frame] for s in stacks]),
        (1, row, (0, 2), volume.values[:, row], [s[:, row] for s in stacks]),
        (2, column, (0, 1), volume.values[:, :, column], [s[:, :, column] for s in stacks]),
    )
    spacing = _index_spacing(volume)
    scale = _pixels_per_mm(volume.values.shape[:3], spacing, side)
    shown = volume.display_window(window)
    panels = []
    for cut, index, axes, values, plane_masks in cuts:
        values, plane_masks, axes, name = _oriented(volume, values, plane_masks, axes)
        size = tuple(max(1, round(values.shape[k] * spacing[axes[k]] * scale)) for k in (1, 0))  # (width, height)
        image = _plane_image(volume, values, shown).resize(size, Image.Resampling.NEAREST)
        resized = [_resize_mask(m, size) for m in plane_masks]
        where = f"{_INDEX_AXES[cut]} {source_frames(volume)[index] if cut == 0 else index}"
        caption = f"{name} ({where})" if name else where
        panels.append(Panel(paint_masks(image, resized, _ALPHA), resized, caption))
    return panels


def _index_spacing(volume: Volume) -> tuple[float, float, float]:
    """Millimetres per step along (frame, row, column): the volume's spacing, else the affine's column
    lengths, else 1; a sample of every ``d``-th source frame is ``d`` times as far apart."""
    step = frame_step(source_frames(volume)) or 1
    if volume.spacing is not None and all(float(s) > 0 for s in volume.spacing):
        between, row, column = (float(s) for s in volume.spacing)
        return (between * step, row, column)
    if volume.affine is not None:
        lengths = np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)[::-1]
        if np.all(lengths > 0):
            return (float(lengths[0]) * step, float(lengths[1]), float(lengths[2]))
    return (1.0, 1.0, 1.0)


def _pixels_per_mm(shape: tuple[int, ...], spacing: tuple[float, float, float], side: int) -> float:
    """``side`` pixels for the volume's longest extent, and at least one pixel per voxel along every axis."""
    extent = max(n * s for n, s in zip(shape, spacing, strict=True))
    return max(side / extent, 1.0 / min(spacing))


def _oriented(
    volume: Volume, values: np.ndarray, masks: list[np.ndarray], axes: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray], tuple[int, int], str | None]:
    """A plane turned to the radiological orientation its affine implies, with its name; as it is (frame axis
    vertical, frame 0 at the top) and unnamed without an affine."""
    affine = ras_affine(volume)
    if affine is None:
        return values, masks, axes, None
    directions = [affine[:3, 2 - axis] for axis in axes]  # the affine's columns are (column, row, frame)
    patient = [int(np.argmax(np.abs(d))) for d in directions]
    if patient[0] == patient[1]:  # an oblique plane: no usual orientation to give it
        return values, masks, axes, None
    if patient[1] > patient[0]:  # the more superior (then anterior) patient axis goes vertical
        values, masks = np.swapaxes(values, 0, 1), [m.T for m in masks]
        axes, directions, patient = axes[::-1], directions[::-1], patient[::-1]
    for k in (0, 1):  # superior/anterior up; the patient's right (sagittal: anterior) on the left
        if directions[k][patient[k]] > 0:
            values, masks = np.flip(values, axis=k), [np.flip(m, axis=k) for m in masks]
    name = _PLANE_NAMES[3 - patient[0] - patient[1]]
    return values, masks, axes, name


def _plane_image(volume: Volume, values: np.ndarray, window: Window | None) -> Image.Image:
    """A plane's modality values (or colour) as an RGB picture, in the window every plane shares."""
    if values.ndim == 3 or window is None:
        return Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).convert("RGB")
    pixels = apply_window(np.ascontiguousarray(values), window)
    if volume.photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return Image.fromarray(pixels).convert("RGB")


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    picture = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8) * 255)
    return np.asarray(picture.resize(size, Image.Resampling.NEAREST)) > 0


def clip_strip(
    volume: Volume,
    masks: MaskInput,
    labels: Sequence[str | None] | None = None,
    window: str | Window | None = None,
    max_frames: int = STRIP_FRAMES,
    columns: int = STRIP_COLUMNS,
) -> Image.Image:
    """The frames with mask (at most ``max_frames``, evenly spread, first and last kept), every mask drawn,
    each numbered (0-based, with its time when the clip has a frame rate), ``columns`` per row; evenly
    spread frames when no frame holds mask."""
    stacks = mask_stacks(masks, volume.values.shape)
    panels = strip_panels(volume, stacks, strip_frames(stacks, volume.num_frames, max_frames), window)
    rows = [panels[k : k + columns] for k in range(0, len(panels), max(1, columns))]
    return compose(rows, [(text, colour(k)) for k, text in enumerate(_legend_lines(volume, stacks, labels))])


def strip_frames(stacks: list[np.ndarray], count: int, max_frames: int = STRIP_FRAMES) -> list[int]:
    """Which frames a strip shows: those with mask, or all ``count``, thinned evenly to ``max_frames``."""
    marked = np.zeros(count, dtype=bool)
    for stack in stacks:
        marked |= stack.reshape(stack.shape[0], -1).any(axis=1)
    candidates = np.flatnonzero(marked) if marked.any() else np.arange(count)
    if len(candidates) <= max_frames:
        return [int(k) for k in candidates]
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, max(1, max_frames))).astype(int))
    return [int(candidates[k]) for k in picks]


def strip_panels(
    volume: Volume, stacks: list[np.ndarray], frames: Sequence[int], window: str | Window | None = None
) -> list[Panel]:
    """One painted, captioned panel per frame, the longer side :data:`TILE_SIDE` (pixel aspect from the
    spacing when known)."""
    height, width = volume.frame_shape
    row_mm, column_mm = (1.0, 1.0) if volume.spacing is None else (float(volume.spacing[1]), float(volume.spacing[2]))
    scale = TILE_SIDE / max(height * row_mm, width * column_mm)
    size = (max(1, round(width * column_mm * scale)), max(1, round(height * row_mm * scale)))
    shown = volume.display_window(window)  # one window for every frame, worked out once
    numbers = source_frames(volume)
    panels = []
    for k in frames:
        image = volume.frame_image(k, shown).resize(size, Image.Resampling.NEAREST)
        resized = [_resize_mask(s[k], size) for s in stacks]
        caption = f"frame {numbers[k]}" + (f" · {numbers[k] / volume.fps:.2f} s" if volume.fps else "")
        panels.append(Panel(paint_masks(image, resized, _ALPHA), resized, caption))
    return panels


def _legend_lines(volume: Volume, stacks: list[np.ndarray], labels: Sequence[str | None] | None) -> list[str]:
    """``K. label: volume (or voxel count), frames`` for each mask."""
    labels = [None] * len(stacks) if labels is None else list(labels)
    if len(labels) != len(stacks):
        raise ValueError(f"{len(stacks)} masks but {len(labels)} labels: give one label (or None) per mask")
    lines = []
    for k, stack in enumerate(stacks):
        measures = measure_stack(volume, stack, k, labels[k])
        unit = "pixels" if volume.kind == "clip" else "voxels"
        amount = f"{measures.volume_ml:.3g} mL" if measures.volume_ml is not None else f"{measures.voxels} {unit}"
        frames = f"frames {measures.frames[0]}-{measures.frames[-1]}" if measures.frames else "no mask"
        lines.append(f"{k + 1}. {labels[k] or 'mask'}: {amount}, {frames}")
    return lines


def compose(rows: Sequence[Sequence[Panel]], lines: Sequence[tuple[str, tuple[int, int, int] | None]]) -> Image.Image:
    """Panels in rows, each under its caption, and the legend lines below (a swatch where a colour is given)."""
    font = label_font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 6
    widths = [sum(p.image.width for p in row) + _GAP * (len(row) + 1) for row in rows]
    heights = [max(p.image.height for p in row) + line + _GAP for row in rows]
    text_width = max((int(probe.textlength(text, font=font)) + line + 2 * _GAP for text, _ in lines), default=0)
    canvas = Image.new("RGB", (max([*widths, text_width]), sum(heights) + _GAP + line * len(lines)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for row, height in zip(rows, heights, strict=True):
        left = _GAP
        for panel in row:
            draw.text((left, top + _GAP // 2), panel.caption, fill=_TEXT, font=font)
            canvas.paste(panel.image, (left, top + line + _GAP // 2))
            left += panel.image.width + _GAP
        top += height
    for k, (text, fill) in enumerate(lines):
        y = top + _GAP + k * line
        if fill is not None:
            draw.rectangle([_GAP, y + 2, _GAP + line - 6, y + line - 4], fill=fill)
        draw.text((_GAP + line, y + 1), text, fill=_TEXT, font=font)
    return canvas
