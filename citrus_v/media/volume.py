"""A stack of 2-D frames on one grid: a CT/MR volume (slices along the normal) or a clip (frames in time).

Every multi-frame reader returns a :class:`Volume`: a NIfTI volume along a chosen axis, a DICOM series (a
folder or a zip of slices), a multi-frame DICOM (enhanced CT/MR, an ultrasound cine loop), a video file. Frames
are kept in display orientation (the same as the 2-D readers give), so that a mask drawn on frame ``k`` is a
2-D mask of ``frames[k]``; writers put a ``[N, H, W]`` mask stack back on the source grid through
``nifti`` (NIfTI) or ``references`` (DICOM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import MedicalImageError
from .windowing import Window, apply_window, full_range_window, parse_window

VolumeKind = Literal["volume", "clip"]

# A 512 x 512 CT of 1024 slices; a source claiming more voxels (frames x pixels x samples) is refused from its
# headers, before any pixel is decoded.
DEFAULT_MAX_VOLUME_VOXELS = 2**28


@dataclass(frozen=True)
class VolumeHeader:
    """What a multi-frame source holds, read from its headers before any pixel is decoded: enough to refuse
    it (:meth:`check`) or to choose the frames to decode (``frame_sampling``)."""

    source: str
    kind: VolumeKind
    num_frames: int
    height: int
    width: int
    samples: int = 1  # 3 for colour
    fps: float | None = None

    @property
    def voxels(self) -> int:
        """Every frame's pixels times samples: what decoding the whole source holds in memory."""
        return self.num_frames * self.height * self.width * self.samples

    def check(
        self, max_voxels: int | None, max_frames: int | None = None, frames: list[int] | None = None
    ) -> list[int]:
        """The frame indices to decode (``frames``, else all), once they exist and fit ``max_frames`` and
        ``max_voxels`` (``None``: no limit); a refusal names the source, the limit and the fix."""
        chosen = list(range(self.num_frames)) if frames is None else [int(k) for k in frames]
        if not chosen:
            raise MedicalImageError(f"{self.source}: no frame asked for (an empty frame list)", "bad_reference")
        outside = [k for k in chosen if not 0 <= k < self.num_frames]
        if outside:
            raise MedicalImageError(
                f"{self.source}: frame(s) {outside[:5]} do not exist; it has {self.num_frames} frame(s) "
                f"(0..{self.num_frames - 1})",
                "bad_reference",
            )
        if max_frames is not None and len(chosen) > max_frames:
            raise MedicalImageError(
                f"{self.source}: {len(chosen)} frames is over the limit of {max_frames}. Fix: send fewer frames "
                "(a shorter clip, a thicker slice spacing), or raise the limit (--max_frames)",
                "image_too_large",
            )
        voxels = len(chosen) * self.height * self.width * self.samples
        if max_voxels is not None and voxels > max_voxels:
            raise MedicalImageError(
                f"{self.source}: {len(chosen)} frames of {self.height}x{self.width}"
                f"{'x' + str(self.samples) if self.samples > 1 else ''} = {voxels} voxels is over the limit of "
                f"{max_voxels}. Fix: crop or downsample the volume, send fewer frames, or raise the limit "
                "(--max_voxels)",
                "image_too_large",
            )
        return chosen


@dataclass(frozen=True)
class FrameReference:
    """Where frame ``k`` came from in a DICOM source: the instance (and its frame number, from 1, for
    multi-frame files), so that a DICOM-SEG can reference it."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, multi-frame instances only
    path: str | None = None


@dataclass
class Volume:
    """``values`` ``[N, H, W]`` (modality values, e.g. Hounsfield units) or ``[N, H, W, 3]`` uint8 colour.

    ``spacing`` is ``(between frames, row, column)`` in millimetres when the source states it (``None`` for an
    uncalibrated clip); ``affine`` maps ``(column, row, frame)`` indices to patient coordinates in mm (DICOM
    LPS, NIfTI RAS) when known. ``window`` is the source's own display window, ``fps`` a clip's frame rate.
    """

    values: np.ndarray
    kind: VolumeKind
    source: str
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    window: Window | None = None
    fps: float | None = None
    photometric: str = "MONOCHROME2"
    references: list[FrameReference] = field(default_factory=list)  # DICOM sources: one per frame
    datasets: list[Any] = field(default_factory=list, repr=False)  # DICOM headers (no pixels), for DICOM-SEG
    nifti: Any = field(default=None, repr=False)  # the NiftiVolume a NIfTI source came from
    axis: int = 2  # NIfTI sources: the RAS+ axis the frames run along
    # the source frame each frame is, when only some were decoded (sampled for the language model); None: all.
    # ``spacing`` and ``affine`` keep indexing the source's frames: frame k lies at source_frames[k]
    source_frames: list[int] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.values.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(height, width)`` of every frame."""
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def voxel_ml(self) -> float | None:
        """The volume of one voxel in millilitres (``None`` without spacing)."""
        if self.spacing is None:
            return None
        return float(np.prod(self.spacing)) / 1000.0

    def display_window(self, window: str | Window | None = None) -> Window | None:
        """The window frames are shown with: the given one, else the source's, else the whole stack's range
        (one window for every frame, so that they look alike)."""
        if self.values.ndim == 4:
            return None
        return parse_window(window) or self.window or full_range_window(self.values)

    def frame_image(self, index: int, window: str | Window | None = None) -> Image.Image:
        """Frame ``index`` as an 8-bit RGB picture."""
        frame = self.values[index]
        if frame.ndim == 3:
            return Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
        pixels = apply_window(frame, self.display_window(window))
        if self.photometric == "MONOCHROME1":
            pixels = 255 - pixels
        return Image.fromarray(pixels).convert("RGB")
