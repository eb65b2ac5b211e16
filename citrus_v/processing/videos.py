"""Video inputs: a volume or a clip as Qwen2.5-VL's video path takes it.

A row's ``"videos"`` (ms-swift's field) holds one entry per ``<video>`` placeholder; an entry is a
:class:`~citrus_v.media.volume.Volume`, a list of frames (PIL images, arrays or image paths, all of one size),
a ``[N, H, W]`` / ``[N, H, W, C]`` array, or a reference :func:`~citrus_v.media.volumes.read_volume` reads (a
NIfTI file, a DICOM series folder or zip, a multi-frame DICOM, a video file; ``#axis=``/``#window=`` options).

The frames the model sees are chosen and sized by :mod:`citrus_v.media.frame_sampling` (qwen_vl_utils' rules,
under ms-swift's ``FPS``/``FPS_MAX_FRAMES``/``VIDEO_MAX_PIXELS``... names), drawn as 8-bit RGB with one
display window for the whole stack (:meth:`~citrus_v.media.volume.Volume.frame_image`) and resized with PIL's
bicubic, as qwen_vl_utils resizes frame lists. A reference decodes only the sampled frames.

The pixels are laid out as transformers' ``Qwen2VLVideoProcessor`` lays them out (``pixel_values_videos``,
``video_grid_thw``): each pair of frames (``temporal_patch_size``) is one temporal patch. That processor needs
torchvision; here the frames go through the image processor the processor already holds (the same resize-free
rescale, normalisation and patch order) and each patch's temporal slots are filled from the frames of its pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..media import Volume
from ..media.frame_sampling import VideoSampling, sample_frames
from .images import load_image, smart_resized

# qwen_vl_utils' rate for a video given as a list of frames (it has none of its own): with a temporal patch of 2
# frames, one second per temporal patch in the rotary time positions (``second_per_grid_ts`` 1.0)
FRAME_LIST_FPS = 2.0

VideoInput = Union[Volume, "LoadedVideo", Sequence[Any], np.ndarray, str, Path, Mapping[str, Any]]


@dataclass
class LoadedVideo:
    """One video as the language model sees it.

    ``frames`` are the RGB frames at the model's size (an even count: the vision tower takes frames in
    pairs), ``positions`` the frame of ``volume`` each one is (the last repeated to pad), ``sample_fps`` the
    rate a clip was sampled at (``None`` for a volume or a frame list).
    """

    frames: list[Image.Image]
    positions: list[int]
    volume: Volume
    sample_fps: float | None = None

    @property
    def source_frames(self) -> list[int]:
        """The frame of the source stack each model frame is (through ``volume.source_frames`` when ``volume``
        holds only some of its source's frames)."""
        known = self.volume.source_frames
        return [known[p] if known is not None else p for p in self.positions]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the model's frames."""
        return self.frames[0].size

    def second_per_grid(self, temporal_patch_size: int) -> float:
        """Seconds per temporal patch, which Qwen2.5-VL's rotary time positions scale by (``second_per_grid_ts``
        in transformers and ms-swift: ``temporal_patch_size / fps``)."""
        return temporal_patch_size / (self.sample_fps or FRAME_LIST_FPS)


def load_video(item: VideoInput, sampling: VideoSampling) -> LoadedVideo:
    """Read ``item`` (see the module docstring) and choose, draw and resize the frames the model sees."""
    if isinstance(item, LoadedVideo):
        return item
    if isinstance(item, Volume):
        return _sampled(item, sampling)
    if isinstance(item, (str, Path, Mapping)):
        return _from_reference(item, sampling)
    if isinstance(item, np.ndarray) and item.ndim in (3, 4):
        return _sampled(_stack([frame for frame in item]), sampling)
    if isinstance(item, (list, tuple)):
        return _sampled(_stack(list(item)), sampling)
    raise TypeError(
        f"unsupported video type {type(item).__name__}: pass a Volume, a list of frames, an [N, H, W] array or "
        "a path (NIfTI, DICOM series folder or zip, multi-frame DICOM, video file)"
    )


def _from_reference(ref: str | Path | Mapping[str, Any], sampling: VideoSampling) -> LoadedVideo:
    """A reference: its header first, then only the sampled frames are decoded."""
    from ..media import probe_volume, read_volume

    header = probe_volume(ref)
    plan = sample_frames(header.num_frames, header.height, header.width, header.fps, sampling)
    volume = read_volume(ref, frames=plan.indices)
    return _drawn(volume, list(range(volume.num_frames)), (plan.width, plan.height), plan.sample_fps)


def _sampled(volume: Volume, sampling: VideoSampling) -> LoadedVideo:
    height, width = volume.frame_shape
    plan = sample_frames(volume.num_frames, height, width, volume.fps, sampling)
    return _drawn(volume, plan.indices, (plan.width, plan.height), plan.sample_fps)


def _drawn(volume: Volume, positions: list[int], size: tuple[int, int], sample_fps: float | None) -> LoadedVideo:
    """The frames at ``positions`` drawn with one window for the stack and resized to ``size`` (width, height)."""
    window = volume.display_window()
    frames = [smart_resized(volume.frame_image(k, window), size) for k in positions]
    return LoadedVideo(frames=frames, positions=list(positions), volume=volume, sample_fps=sample_fps)


def _stack(frames: list[Any]) -> Volume:
    """A frame list as a :class:`Volume`: 2-D arrays as one grey stack (windowed together), anything else as
    RGB pictures."""
    if not frames:
        raise ValueError("a video with no frames: give at least one frame")
    if all(isinstance(f, np.ndarray) and f.ndim == 2 for f in frames):
        values, kind = _same_size([np.asarray(f) for f in frames]), "volume"
    else:
        values, kind = _same_size([np.asarray(load_image(f)) for f in frames]), "clip"
    return Volume(values=values, kind=kind, source="a list of frames")


def _same_size(arrays: list[np.ndarray]) -> np.ndarray:
    first = arrays[0].shape[:2]
    for k, array in enumerate(arrays):
        if array.shape[:2] != first:
            raise ValueError(
                f"frame {k} is {array.shape[1]}x{array.shape[0]} but frame 0 is {first[1]}x{first[0]}: the frames "
                "of one video must share one size. Fix: resize or crop them alike, or send them as images"
            )
    return np.stack(arrays)


def video_pixel_values(
    image_processor: Qwen2VLImageProcessorPil, frames: Sequence[Image.Image]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values_videos`` ``[t·h·w, C·T·p·p]`` and ``video_grid_thw`` ``[1, 3]`` of one video's frames (all of
    one size, multiples of patch × merge), laid out as transformers' ``Qwen2VLVideoProcessor.patchify``: the
    frames in groups of ``T = temporal_patch_size`` (the last one repeated to fill a group)."""
    temporal, patch = int(image_processor.temporal_patch_size), int(image_processor.patch_size)
    frames = list(frames) + [frames[-1]] * (-len(frames) % temporal)
    processed = image_processor(images=frames, do_resize=False, return_tensors="pt")
    _, grid_h, grid_w = (int(v) for v in processed["image_grid_thw"][0])
    cells, groups = grid_h * grid_w, len(frames) // temporal
    # each frame alone: its patches' T slots all hold that frame; keep one, then put each group's frames there
    single = processed["pixel_values"].view(len(frames), cells, -1, temporal, patch, patch)[:, :, :, 0]
    paired = single.view(groups, temporal, cells, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return paired.reshape(groups * cells, -1).contiguous(), torch.tensor([[groups, grid_h, grid_w]])
