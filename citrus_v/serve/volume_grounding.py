"""A volume or clip answer's masks as the API's ``grounding`` fields: per ``[SEG]``, the frames with mask as COCO
RLE, whether SAM 2 found the target, and the measures (mL, spacing, 3-D box).

Frames are named by their index in the source's stack (what :func:`citrus_v.media.read_volume` gives: a NIfTI's
display slices along its axis, a DICOM series ordered along the normal, a clip's frames in time), so that a
client rebuilds the ``[frames, height, width]`` stack from ``video_size`` and the RLE of each listed frame. A
target SAM 2 finds on no frame (``present: false``) lists no frame. numpy and pycocotools only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..infer.results import VolumeMask
from ..media import mask_to_rle
from .protocol import RLE, BoundingBox3D, FrameMask, GroundingVolumeMask, VideoSize


def video_size(prediction: Any) -> VideoSize | None:
    """The first video's frames and frame size as its source holds them; ``None`` without a video."""
    videos = getattr(prediction, "videos", None) or []
    if not videos:
        return None
    volume = videos[0].volume
    height, width = volume.frame_shape
    frames = volume.num_frames if volume.source_frames is None else max(volume.source_frames) + 1
    return VideoSize(frames=frames, height=height, width=width)


def _frames(mask: VolumeMask) -> list[FrameMask]:
    """The frames that hold mask, each as COCO RLE of one frame, under its source frame number."""
    numbers = mask.source_frames
    areas = mask.mask.reshape(mask.mask.shape[0], -1).sum(axis=1)
    return [
        FrameMask(frame=int(numbers[k]), area=int(areas[k]), rle=RLE(**mask_to_rle(mask.mask[k])))
        for k in np.flatnonzero(areas)
    ]


def _finite(value: float) -> float:
    """A JSON number: SAM 2's logits are finite, but an empty score list gives minus infinity."""
    return float(value) if math.isfinite(value) else -1e9


def to_volume_mask(mask: VolumeMask) -> GroundingVolumeMask:
    """One ``[SEG]``'s mask through the video (see the module docstring)."""
    measures = mask.measures() if mask.volume is not None else None
    box = None if measures is None or measures.bbox3d is None else measures.bbox3d
    return GroundingVolumeMask(
        index=mask.index,
        label=mask.label,
        present=bool(mask.present),
        score=_finite(mask.score),
        mode=mask.mode,
        key_frame=int(mask.source_frames[mask.key_frame]),
        frames=_frames(mask),
        voxels=int(mask.mask.sum()),
        volume_ml=None if measures is None else measures.volume_ml,
        spacing=None if measures is None or measures.spacing is None else [float(s) for s in measures.spacing],
        bbox3d=None if box is None else BoundingBox3D(**box.to_json()),
    )


def to_volume_masks(prediction: Any) -> list[GroundingVolumeMask]:
    """Every ``[SEG]``'s mask through the first video, in order (none for an answer without ``[SEG]``)."""
    return [to_volume_mask(mask) for mask in getattr(prediction, "volume_masks", None) or []]
