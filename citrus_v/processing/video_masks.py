"""Training targets of a volume or a clip: the frames SAM 2 trains on, their SAM 2 input and their mask targets.

A row with a video and no image gives one 3-D mask per ``[SEG]``: a label volume reference
(``labels.nii.gz#label=3``, read with :func:`~citrus_v.media.volumes.read_volume`, the named values selected) or an
``[N, H, W]`` array, on the video's source grid (one frame per frame of the source, each the source frame's size).

SAM 2 trains on a few frames of each such sample (``count``, the processor's ``sam_train_frames``), chosen by
:func:`choose_frames`: half of them (rounded down) where no target of the sample is present, when the source has
such frames, the rest where a target is, each target on at least one of them while there is room; random among
those, from a generator seeded by the training seed, the row's draw number and the video's name, so that one
seed gives the same frames again. The frames are drawn as the language model's frames are (one display window
for the stack) at the source's own resolution, and made SAM 2's input by the processor's ``sam_pixel_values``,
as inference draws every frame of a volume. The targets are low-resolution masks made as the 2-D ones are
(:func:`~citrus_v.processing.images.mask_target`), and ``present`` says on which of the frames each target is.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..media import DEFAULT_MAX_VOLUME_VOXELS, parse_ref, probe_volume, read_volume
from .images import mask_target
from .videos import LoadedVideo, VideoInput

# frames of a volume or clip that SAM 2 trains on per sample (a processor and collator setting)
DEFAULT_SAM_TRAIN_FRAMES = 4

MaskStackInput = str | Path | Mapping[str, Any] | np.ndarray | torch.Tensor


class VideoMaskError(ValueError):
    """A video row's masks that cannot be training targets, with the fix in the message."""


@dataclass
class VideoTargets:
    """One video sample's SAM 2 training input and targets over its ``F`` chosen frames.

    ``frames``: the source frame of each (ascending); ``sam_pixel_values`` ``[F, 3, S, S]``; ``masks``
    ``[K, F, h, w]`` low-resolution targets, one row per ``[SEG]``; ``present`` ``[K, F]`` bool, whether the
    target has a voxel on the frame.
    """

    frames: list[int]
    sam_pixel_values: torch.Tensor
    masks: torch.Tensor
    present: torch.Tensor


def load_mask_stack(mask: MaskStackInput, max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS) -> np.ndarray:
    """A 3-D mask as a boolean ``[N, H, W]`` stack: a label volume reference (its ``label=`` values, else any
    non-zero voxel; colour frames count any channel) or an ``[N, H, W]`` array or tensor (non-zero)."""
    if isinstance(mask, (str, Path, Mapping)):
        label = parse_ref(mask).label
        values = read_volume(mask, max_voxels=max_voxels).values
        if values.ndim == 4:
            values = values.max(axis=-1)
        return np.isin(values, label) if label is not None else values != 0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        if mask.ndim != 3:
            raise VideoMaskError(
                f"a video's mask must be [frames, H, W] (one frame per frame of the video); got shape {mask.shape}"
            )
        return mask != 0
    raise TypeError(
        f"unsupported video mask type {type(mask).__name__}: pass a label volume reference "
        "('labels.nii.gz#label=3') or an [N, H, W] array"
    )


def frame_rng(seed: int, draw: int, source: object) -> np.random.Generator:
    """The generator of one sample's frame choice: the training seed, the row's draw number (its place in the
    epoch) and the video's name (a reference's text; in-memory videos share one)."""
    name = str(source) if isinstance(source, (str, Path, Mapping)) else ""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(draw) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def choose_frames(presence: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` frames (fewer when the source has fewer) of a ``[K, N]`` presence table, ascending: half of them
    (rounded down) without any target when there are such frames, the rest with one, each of the ``K`` targets
    present on at least one while there is room (see the module docstring)."""
    if presence.ndim != 2 or presence.shape[1] == 0:
        raise VideoMaskError(f"a presence table must be [targets, frames] with frames >= 1; got {presence.shape}")
    count = min(int(count), presence.shape[1])
    if count < 1:
        raise VideoMaskError(f"sam_train_frames must be at least 1, got {count}")
    with_target = np.flatnonzero(presence.any(axis=0))
    without = np.flatnonzero(~presence.any(axis=0))
    absent_share = min(len(without), count // 2 if len(with_target) else count)
    present_share = min(len(with_target), count - absent_share)
    absent_share = min(len(without), count - present_share)  # too few frames with a target: fill without
    picked: list[int] = []
    for row in presence:  # one frame for each target first, in [SEG] order
        if row.any() and len(picked) < present_share and not row[picked].any():
            picked.append(int(rng.choice(np.flatnonzero(row))))
    rest = np.setdiff1d(with_target, picked)
    picked += [int(k) for k in rng.choice(rest, present_share - len(picked), replace=False)]
    picked += [int(k) for k in rng.choice(without, absent_share, replace=False)]
    return sorted(picked)


def source_frame_count(item: VideoInput, loaded: LoadedVideo) -> int:
    """How many frames the video's source has (a reference's header when only its sampled frames were read)."""
    if loaded.volume.source_frames is None:
        return loaded.volume.num_frames
    if isinstance(item, (str, Path, Mapping)):
        return probe_volume(item).num_frames
    return max(loaded.volume.source_frames) + 1


def frame_images(item: VideoInput, loaded: LoadedVideo, indices: Sequence[int]) -> list[Image.Image]:
    """The source frames at ``indices`` as RGB pictures, drawn with the language model's display window."""
    volume = loaded.volume
    window = volume.display_window()
    if volume.source_frames is None:
        return [volume.frame_image(k, window) for k in indices]
    if isinstance(item, (str, Path, Mapping)):
        subset = read_volume(item, frames=list(indices))
        return [subset.frame_image(position, window) for position in range(len(indices))]
    held = {int(number): position for position, number in enumerate(volume.source_frames)}
    missing = [k for k in indices if k not in held]
    if missing:
        raise VideoMaskError(
            f"frames {missing[:5]} of the video were never decoded: pass the video as a reference or a whole "
            "Volume to train SAM 2 on its frames"
        )
    return [volume.frame_image(held[k], window) for k in indices]


def video_targets(
    item: VideoInput,
    loaded: LoadedVideo,
    masks: Sequence[MaskStackInput],
    count: int,
    rng: np.random.Generator,
    sam_pixels: Callable[[Image.Image], torch.Tensor],
    mask_size: tuple[int, int],
) -> VideoTargets:
    """The SAM 2 input and targets of one video sample (see the module docstring); ``sam_pixels`` makes SAM 2's
    input of one frame, ``mask_size`` is the low-resolution ``(h, w)``."""
    stacks = [load_mask_stack(mask) for mask in masks]
    expected = (source_frame_count(item, loaded), *loaded.volume.frame_shape)
    for k, stack in enumerate(stacks):
        if stack.shape != expected:
            raise VideoMaskError(
                f"masks[{k}] is {stack.shape[0]} frame(s) of {stack.shape[2]}x{stack.shape[1]} but videos[0] is "
                f"{expected[0]} frame(s) of {expected[2]}x{expected[1]}: a video's mask must have one frame per "
                "frame of the video, each its size (same axis: give the mask the video's axis=)"
            )
    presence = np.stack([stack.reshape(stack.shape[0], -1).any(axis=1) for stack in stacks])
    frames = choose_frames(presence, count, rng)
    pixels = torch.stack([sam_pixels(image) for image in frame_images(item, loaded, frames)])
    targets = torch.stack([torch.stack([mask_target(stack[k], mask_size) for k in frames]) for stack in stacks])
    present = torch.from_numpy(presence[:, frames].copy())
    return VideoTargets(frames=frames, sam_pixel_values=pixels, masks=targets, present=present)
