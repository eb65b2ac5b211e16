"""Ground truth of a volume or clip sample: its 3-D mask references read as ``[N, H, W]`` stacks, and their checks.

A ``seg3d`` sample names one video (``sample.videos[0]``: a NIfTI volume, a DICOM series, a multi-frame DICOM
or a video file, as :func:`citrus_v.media.read_volume` reads them) and one 3-D mask reference per ``[SEG]``, e.g.
``labels.nii.gz#label=3``: a label volume read with :func:`~citrus_v.media.read_volume` (so in the same display
orientation as the video's frames), foreground where the value is one of ``label`` (any non-zero value
without it). A mask reference without ``axis`` is read along the video's ``axis``. The stack must have the
video's shape ``(frames, rows, columns)``; its voxel spacing ``(between frames, row, column)`` is what HD95 (mm)
and the volumes (mL) use. Whether the source is a volume or a clip comes from the video's headers.

Everything here is checked from headers before the model runs (:func:`check_volume_sample`), so that a wrong
ground truth fails the run at once with the sample and the file named, not after an hour of generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..media import MediaRef, MedicalImageError, VolumeHeader, parse_ref, probe_volume, read_volume
from .samples import EvalDataError, EvalSample


@dataclass
class ReferenceStacks:
    """The reference mask stacks of one sample, on the video's grid."""

    masks: list[np.ndarray]  # one boolean [N, H, W] per [SEG]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    kind: str  # "volume" or "clip", from the video's headers


def video_ref(sample: EvalSample) -> MediaRef:
    """The sample's one video reference, resolved against its base folder."""
    if len(sample.videos) != 1:
        raise EvalDataError(
            f"{sample.where()}: a volume sample needs exactly one video (its 'videos' holds {len(sample.videos)})"
        )
    return _parse(sample, sample.videos[0], "video")


def video_header(sample: EvalSample) -> VolumeHeader:
    """Frames, frame size and kind (volume or clip) of the sample's video, from its headers."""
    ref = video_ref(sample)
    try:
        return probe_volume(ref)
    except MedicalImageError as err:
        raise EvalDataError(f"{sample.where()}: video: {err}") from None


def mask_ref(sample: EvalSample, ref: Any, index: int) -> MediaRef:
    """Mask reference ``index`` of the sample; without its own ``axis`` it takes the video's."""
    parsed = _parse(sample, ref, f"mask {index}")
    if parsed.axis is None:
        parsed.axis = video_ref(sample).axis
    return parsed


def check_volume_sample(sample: EvalSample) -> None:
    """Check from headers only: the video is readable and every mask stack has the video's shape."""
    if not sample.videos:
        return
    header = video_header(sample)
    expected = (header.num_frames, header.height, header.width)
    if sample.task != "seg3d":
        return
    for index, ref in enumerate(sample.reference or []):
        parsed = mask_ref(sample, ref, index)
        try:
            mask_header = probe_volume(parsed)
        except MedicalImageError as err:
            raise EvalDataError(f"{sample.where()}: mask {index}: {err}") from None
        _check_shape(sample, index, (mask_header.num_frames, mask_header.height, mask_header.width), expected)


def reference_stacks(sample: EvalSample) -> ReferenceStacks:
    """Read every 3-D mask reference of a ``seg3d`` sample as a boolean stack on the video's grid."""
    header = video_header(sample)
    expected = (header.num_frames, header.height, header.width)
    masks: list[np.ndarray] = []
    spacing = None
    for index, ref in enumerate(sample.reference or []):
        parsed = mask_ref(sample, ref, index)
        try:
            volume = read_volume(parsed)
        except MedicalImageError as err:
            raise EvalDataError(f"{sample.where()}: mask {index}: {err}") from None
        values = volume.values if volume.values.ndim == 3 else volume.values.max(axis=-1)
        _check_shape(sample, index, tuple(values.shape), expected)
        masks.append(np.isin(values, parsed.label) if parsed.label is not None else values > 0)
        spacing = spacing or volume.spacing
    return ReferenceStacks(masks, expected, _spacing(spacing), header.kind)


def _parse(sample: EvalSample, ref: Any, what: str) -> MediaRef:
    try:
        return parse_ref(ref, sample.base_dir)
    except MedicalImageError as err:
        raise EvalDataError(f"{sample.where()}: {what}: {err}") from None


def _check_shape(sample: EvalSample, index: int, shape: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    if tuple(shape) != expected:
        raise EvalDataError(
            f"{sample.where()}: ground-truth mask {index} is {shape[0]} frames of {shape[1]}x{shape[2]} (rows x "
            f"columns) but its video is {expected[0]} frames of {expected[1]}x{expected[2]}; a 3-D mask must be on "
            "its video's grid (same file grid and the same axis=)"
        )


def _spacing(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    step = tuple(float(s) for s in value)
    return step if len(step) == 3 and min(step) > 0 else None  # type: ignore[return-value]
