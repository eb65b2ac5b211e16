"""A request's volumes and clips measured from their headers, and checked as a whole before any frame is decoded.

Each video part is fetched (its file bytes: :mod:`~citrus_v.serve.video_sources`) and probed (frames, frame
size, samples, frame rate), and the frames and voxels of all videos of the request together are held to
``--max_video_frames`` and ``--max_video_voxels`` as each one is measured, so that an oversized request stops
at the first video that passes them (413 ``video_too_large``). :func:`video_tokens` counts the tokens a video
costs the language model after ms-swift's frame sampling and the video pixel bounds
(:mod:`citrus_v.media.frame_sampling`, under the processor's ``FPS``/``FPS_MAX_FRAMES``/``VIDEO_*`` settings),
which the server counts with the text and image tokens against the context; :func:`sam_frame_bytes` is what
SAM 2 holds per frame it segments, for the memory estimate
(:class:`~citrus_v.serve.request_budget.MemoryModel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..media import MedicalImageError, Volume
from ..media.frame_sampling import sample_frames
from ..media.volume import VolumeHeader
from .errors import ApiError
from .media import MediaError
from .messages import VideoSource
from .request_budget import (
    COLOUR_VALUE_COPIES,
    GREY_VALUE_COPIES,
    GREY_WINDOW_BYTES,
    VideoFootprint,
    nifti_value_bytes,
)
from .video_sources import VideoData, VideoPolicy, decode, fetch, probe

# the DICOM readers' modality values are float64
DICOM_VALUE_BYTES = 8


@dataclass
class MeasuredVideo:
    """One video of a request: its source, its header, and its file bytes until it is decoded."""

    source: VideoSource
    header: VolumeHeader
    data: VideoData | None

    @property
    def encoded_bytes(self) -> int:
        """The file's bytes held while it waits to be decoded (0 once decoded)."""
        return 0 if self.data is None else len(self.data.data)

    def decode(self) -> Volume:
        """Every frame, decoded now; the file's bytes are let go."""
        if self.data is None:
            raise RuntimeError(f"{self.source.param}: this video was decoded already")
        data, self.data = self.data, None
        return decode(data, self.header, self.source.param)


def _over(kind: str, total: int, limit: int, flag: str, videos: Sequence[MeasuredVideo]) -> ApiError:
    shown = ", ".join(
        f"{m.header.num_frames}x{m.header.height}x{m.header.width}{'x3' if m.header.samples > 1 else ''}"
        for m in videos[:8]
    )
    return ApiError(
        413,
        f"the request's {len(videos)} video(s) ({shown}) hold {total} {kind} in all, over this server's limit of "
        f"{limit} per request ({flag}); send fewer or shorter videos (fewer slices or frames, a smaller frame), or "
        "ask the server's operator to raise the limit",
        "video_too_large",
        param=videos[-1].source.param,
    )


def check_videos(videos: Sequence[MeasuredVideo], policy: VideoPolicy) -> None:
    """Refuse a request whose videos together pass ``policy.max_frames`` or ``policy.max_voxels`` (413)."""
    frames = sum(video.header.num_frames for video in videos)
    if frames > policy.max_frames:
        raise _over("frames", frames, policy.max_frames, "--max_video_frames", videos)
    voxels = sum(video.header.voxels for video in videos)
    if voxels > policy.max_voxels:
        raise _over("voxels", voxels, policy.max_voxels, "--max_video_voxels", videos)


def measure_videos(sources: Sequence[VideoSource], policy: VideoPolicy) -> list[MeasuredVideo]:
    """Every video fetched and measured from its headers, the request's limits checked after each one; raises
    :class:`MediaError` for a video refused on its own and :class:`ApiError` for the request over a limit."""
    measured: list[MeasuredVideo] = []
    for source in sources:
        data = fetch(source, policy)
        measured.append(MeasuredVideo(source, probe(data, source.param), data))
        check_videos(measured, policy)
    return measured


def video_tokens(processor: Any, header: VolumeHeader, param: str = "messages") -> int:
    """The ``<|video_pad|>`` tokens one video costs: the frames ms-swift's rules sample (an even count), each
    resized within the video pixel bounds, two frames to a temporal patch, one token per merged patch."""
    image_processor = processor.image_processor
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    temporal = int(getattr(image_processor, "temporal_patch_size", 2) or 2)
    try:
        plan = sample_frames(header.num_frames, header.height, header.width, header.fps, processor.video_sampling)
    except MedicalImageError as err:
        raise MediaError(f"the video cannot be shown to the model: {err}", "invalid_video", 400, param) from err
    groups = math.ceil(len(plan.indices) / temporal)
    return groups * (plan.height // patch) * (plan.width // patch) // (merge * merge)


def decoded_bytes(video: VideoData | None, header: VolumeHeader) -> int:
    """The bytes the readers hold of one video's decoded values: colour (a video's RGB, colour DICOM) one byte
    a value in ``COLOUR_VALUE_COPIES`` copies; grey values (a NIfTI file's own type from its header, DICOM's
    float64 modality values) in ``GREY_VALUE_COPIES`` copies and a float64 stack for the display window."""
    from ..media.nifti import is_nifti

    if header.samples > 1:
        return COLOUR_VALUE_COPIES * header.voxels
    nifti = video is not None and is_nifti(video.data)
    itemsize = nifti_value_bytes(video.data) if nifti else DICOM_VALUE_BYTES
    return (GREY_VALUE_COPIES * itemsize + GREY_WINDOW_BYTES) * header.voxels


def footprint(processor: Any, video: MeasuredVideo) -> VideoFootprint:
    """What one measured video costs before it is decoded (see :class:`~citrus_v.serve.request_budget.MemoryModel`)."""
    header = video.header
    return VideoFootprint(
        frames=header.num_frames,
        frame_pixels=header.num_frames * header.height * header.width,
        decoded_bytes=decoded_bytes(video.data, header),
        model_pixels=model_frame_pixels(processor, header),
        encoded_bytes=video.encoded_bytes,
    )


def model_frame_pixels(processor: Any, header: VolumeHeader) -> int:
    """The pixels of the frames the language model sees of one video, all together (at their resized size)."""
    plan = sample_frames(header.num_frames, header.height, header.width, header.fps, processor.video_sampling)
    return len(plan.indices) * plan.height * plan.width


def sam_frame_bytes(model: Any, processor: Any, itemsize: int) -> int:
    """What SAM 2 holds for one frame it segments: its ``3 × S × S`` input and its image features (every level
    of the feature pyramid, ``fpn_hidden_size`` channels), in ``itemsize`` bytes; 0 for a model without them."""
    grounding = getattr(model, "grounding_encoder", None)
    size = int(getattr(processor, "sam_image_size", 0) or 0)
    levels = getattr(grounding, "backbone_feature_sizes", None) or []
    vision = getattr(getattr(grounding, "config", None), "vision_config", None)
    channels = int(getattr(vision, "fpn_hidden_size", 0) or 0)
    features = sum(channels * int(h) * int(w) for h, w in levels)
    return int((3 * size * size + features) * itemsize)
