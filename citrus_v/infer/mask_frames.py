"""Which frames of a volume or clip SAM 2 segments: every frame of the source, up to a bound.

The language model sees a sample of a video's frames (ms-swift's ``FPS_MAX_FRAMES``/``VIDEO_*`` rules); a mask
must cover every slice, so SAM 2 sees every frame of the source at its own resolution, up to ``max_frames``
(and the voxel bound): a source with more frames is segmented on that many evenly spaced ones, and the choice
says so (:attr:`MaskFrames.note`). A reference (a path, or a dict with ``path``) is read again for that,
headers first; a ``Volume`` or a frame list given in Python already holds every frame.

numpy and the media readers only (no torch), so that the command line can name the default bound cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..media import DEFAULT_MAX_VOLUME_VOXELS, MedicalImageError, Volume, probe_volume, read_volume

if TYPE_CHECKING:
    from ..processing.videos import LoadedVideo, VideoInput

# the most frames SAM 2 segments per video (a CT of 512 slices; more are segmented on evenly spaced ones)
DEFAULT_MAX_FRAMES = 512


@dataclass
class MaskFrames:
    """The frames SAM 2 segments: ``volume`` (all of its source's frames, or an even sample of them), how many
    frames the source has, and a note when SAM 2 does not see every one of them."""

    volume: Volume
    source_count: int
    note: str | None = None


def even_frames(count: int, limit: int) -> list[int]:
    """``limit`` frames of ``count`` evenly spaced, the first and the last kept (all of them within the limit)."""
    if count <= limit:
        return list(range(count))
    return sorted({int(k) for k in np.linspace(0, count - 1, max(limit, 1)).round()})


def frame_subset(volume: Volume, indices: Sequence[int]) -> Volume:
    """``volume`` with only the frames at ``indices`` (in that order): per-frame references and headers follow,
    and ``source_frames`` names each kept frame's place in the source."""
    indices = [int(k) for k in indices]
    count = volume.num_frames
    numbers = volume.source_frames if volume.source_frames is not None else list(range(count))

    def per_frame(items: list) -> list:
        return [items[k] for k in indices] if len(items) == count else list(items)

    return replace(
        volume,
        values=volume.values[indices],
        references=per_frame(volume.references),
        datasets=per_frame(volume.datasets),
        source_frames=[int(numbers[k]) for k in indices],
    )


def mask_frames(
    source: VideoInput | None, loaded: LoadedVideo, max_frames: int, max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS
) -> MaskFrames:
    """The frames of one video SAM 2 segments (see the module docstring): the loaded volume when it holds every
    frame of its source, else the source read again when it is a reference, else the distinct frames the
    language model saw."""
    volume = loaded.volume
    if volume.source_frames is None:
        keep = even_frames(volume.num_frames, max_frames)
        chosen = volume if len(keep) == volume.num_frames else frame_subset(volume, keep)
        return MaskFrames(chosen, volume.num_frames, _sampled_note(len(keep), volume.num_frames, "max_frames"))
    reason = "the source's other frames were never decoded (pass the video as a path or a Volume)"
    if isinstance(source, (str, Path, Mapping)):
        try:
            return _reread(source, max_frames, max_voxels)
        except (MedicalImageError, OSError) as err:  # changed or gone since the language model read it
            reason = f"the source could not be read again ({err})"
    first: dict[int, int] = {}  # each distinct source frame once (the model's frames repeat the last to pad)
    for position, number in enumerate(volume.source_frames):
        first.setdefault(int(number), position)
    chosen = frame_subset(volume, [first[number] for number in sorted(first)])
    note = f"SAM 2 segmented only the {chosen.num_frames} frame(s) the language model saw: {reason}"
    return MaskFrames(chosen, chosen.num_frames, note)


def _reread(source: str | Path | Mapping, max_frames: int, max_voxels: int | None) -> MaskFrames:
    """Every frame of a reference, or an even sample within ``max_frames`` and ``max_voxels``."""
    header = probe_volume(source)
    limit, bound = max_frames, "max_frames"
    per_frame = max(header.height * header.width * header.samples, 1)
    if max_voxels is not None and max_voxels // per_frame < limit:
        limit, bound = max(max_voxels // per_frame, 1), "max_voxels"
    keep = even_frames(header.num_frames, limit)
    volume = read_volume(source, frames=None if len(keep) == header.num_frames else keep, max_voxels=max_voxels)
    return MaskFrames(volume, header.num_frames, _sampled_note(len(keep), header.num_frames, bound))


def _sampled_note(kept: int, count: int, bound: str) -> str | None:
    if kept == count:
        return None
    return (
        f"SAM 2 segmented {kept} evenly spaced frames of {count} (the {bound} bound); the frames between them "
        f"have no mask. Fix: raise --{bound} to segment every frame"
    )
