"""Which frames of a clip or volume the language model sees, and at what size: Qwen2.5-VL's video rules.

The arithmetic is qwen_vl_utils' (``smart_nframes``, ``fetch_video``, ``smart_resize``), which ms-swift uses
for Qwen2.5-VL and configures through the environment variables named here (``FPS``, ``FPS_MIN_FRAMES``,
``FPS_MAX_FRAMES``, ``FRAME_FACTOR``, ``VIDEO_MIN_PIXELS``, ``VIDEO_MAX_PIXELS``, ``VIDEO_TOTAL_PIXELS``,
``IMAGE_FACTOR``):

* a clip with a frame rate is sampled at ``FPS`` frames per second, at least ``FPS_MIN_FRAMES`` and at most
  ``FPS_MAX_FRAMES`` frames, rounded down to a multiple of ``FRAME_FACTOR`` (the vision tower merges frames
  in pairs), the indices spread evenly over the clip (``linspace``, rounded);
* a volume has no frame rate: like a list of frames, every slice is kept up to ``FPS_MAX_FRAMES`` (evenly
  spaced slices beyond), and an odd count is padded by repeating the last one, as qwen_vl_utils pads frame
  lists;
* each frame is resized to multiples of ``IMAGE_FACTOR`` with at least ``VIDEO_MIN_PIXELS`` and at most
  ``min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / frames * FRAME_FACTOR)`` pixels (never under 1.05 x the
  minimum).

Pure functions of numbers: they decide which frames to decode before any pixel is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import MedicalImageError

# qwen_vl_utils' defaults (its VIDEO_TOTAL_PIXELS default is 90% of a 128 000-token context of 28 x 28 patches)
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200


@dataclass(frozen=True)
class VideoSampling:
    """The video knobs, under ms-swift's environment-variable names (lower case here)."""

    fps: float = FPS
    fps_min_frames: int = FPS_MIN_FRAMES
    fps_max_frames: int = FPS_MAX_FRAMES
    frame_factor: int = FRAME_FACTOR
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    video_total_pixels: int = VIDEO_TOTAL_PIXELS
    image_factor: int = IMAGE_FACTOR

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], base: VideoSampling | None = None, **overrides: float | int | None
    ) -> VideoSampling:
        """Values from ``environ`` (e.g. ``os.environ``) under the upper-case names, as ms-swift reads them,
        over ``base`` (default: qwen_vl_utils' values); ``overrides`` that are not ``None`` win (e.g.
        ``fps_max_frames`` from ``--max_frames``)."""
        values: dict[str, float | int] = {}
        for spec in fields(cls):
            text = environ.get(spec.name.upper())
            if text is not None and str(text).strip():
                cast = float if spec.name == "fps" else int
                try:
                    values[spec.name] = cast(float(text)) if cast is int else cast(text)
                except ValueError as err:
                    raise MedicalImageError(
                        f"{spec.name.upper()}={text!r} is not a number", "bad_reference"
                    ) from err
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(base if base is not None else cls(), **values)


@dataclass(frozen=True)
class FrameSample:
    """The frames the model sees: source frame ``indices`` (repeats allowed), the rate they were sampled at
    (``None`` for a volume), and the ``(height, width)`` every frame is resized to."""

    indices: list[int]
    sample_fps: float | None
    height: int
    width: int


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_nframes(total_frames: int, video_fps: float, sampling: VideoSampling = VideoSampling()) -> int:
    """How many frames of a clip of ``total_frames`` at ``video_fps`` the model sees (qwen_vl_utils)."""
    factor = sampling.frame_factor
    min_frames = ceil_by_factor(sampling.fps_min_frames, factor)
    max_frames = floor_by_factor(min(sampling.fps_max_frames, total_frames), factor)
    nframes = total_frames / video_fps * sampling.fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = floor_by_factor(nframes, factor)
    if not factor <= nframes <= total_frames:
        raise MedicalImageError(
            f"a clip of {total_frames} frame(s) gives {nframes} frames to show; the model needs {factor} to "
            f"{total_frames}. Fix: send a longer clip, or raise FPS_MAX_FRAMES / --max_frames to at least {factor}",
            "bad_reference",
        )
    return nframes


def clip_frame_indices(total_frames: int, video_fps: float, sampling: VideoSampling = VideoSampling()) -> list[int]:
    """The frames of a clip the model sees: ``smart_nframes`` of them, evenly spread (``linspace``, rounded)."""
    nframes = smart_nframes(total_frames, video_fps, sampling)
    return [int(i) for i in np.linspace(0, total_frames - 1, nframes).round()]


def volume_frame_indices(total_frames: int, sampling: VideoSampling = VideoSampling()) -> list[int]:
    """The slices of a volume (or frames of a clip without a rate) the model sees: all of them up to
    ``fps_max_frames`` (rounded down to ``frame_factor``), evenly spaced beyond; an odd count padded with
    the last slice."""
    if total_frames < 1:
        raise MedicalImageError("a volume without frames has nothing to show", "bad_reference")
    factor = sampling.frame_factor
    limit = max(floor_by_factor(sampling.fps_max_frames, factor), factor)
    count = min(total_frames, limit)
    indices = [int(i) for i in np.linspace(0, total_frames - 1, count).round()]
    padded = ceil_by_factor(len(indices), factor)
    return indices + [indices[-1]] * (padded - len(indices))


def frame_pixel_bounds(nframes: int, sampling: VideoSampling = VideoSampling()) -> tuple[int, float]:
    """``(min_pixels, max_pixels)`` of one frame when ``nframes`` are shown (qwen_vl_utils' ``fetch_video``)."""
    min_pixels = sampling.video_min_pixels
    share = sampling.video_total_pixels / nframes * sampling.frame_factor
    return min_pixels, max(min(sampling.video_max_pixels, share), int(min_pixels * 1.05))


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """``(height, width)`` in multiples of ``factor``, within the pixel bounds, keeping the aspect ratio."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise MedicalImageError(
            f"a {width}x{height} frame has an aspect ratio over {MAX_RATIO}; crop it", "unsupported_image"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def sample_frames(
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    sampling: VideoSampling = VideoSampling(),
) -> FrameSample:
    """The frames (and their size) the model sees of a clip at ``fps``, or of a volume (``fps`` None).

    A clip too short for the rate rule (fewer frames than ``frame_factor``) is shown as a frame list, padded.
    """
    if fps is not None and fps > 0 and num_frames >= sampling.frame_factor:
        indices = clip_frame_indices(num_frames, fps, sampling)
        sample_fps: float | None = len(indices) / max(num_frames, 1e-6) * fps
    else:
        indices, sample_fps = volume_frame_indices(num_frames, sampling), None
    min_pixels, max_pixels = frame_pixel_bounds(len(indices), sampling)
    resized = smart_resize(height, width, sampling.image_factor, min_pixels, max_pixels)
    return FrameSample(indices, sample_fps, resized[0], resized[1])
