"""Video files (mp4, mov, avi, webm, mkv, ...) as clips, decoded with PyAV (FFmpeg).

The stream's header gives the frame count, size and frame rate, so a clip is refused before decoding when it
is over the limits; then frames are decoded in order and only those asked for are converted to RGB, stopping
after the last one. A stream that does not state its frame count is counted by its packets (no decoding).
PyAV is an optional dependency (``pip install 'citrus-v[video]'``), imported on first use.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MedicalImageError, require_file
from .volume import DEFAULT_MAX_VOLUME_VOXELS, Volume, VolumeHeader

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv")


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES)


def _import_av() -> Any:
    try:
        import av
    except ImportError as err:
        raise MedicalImageError(
            "reading video files needs PyAV. Fix: pip install 'citrus-v[video]'", "unsupported_image"
        ) from err
    return av


@contextmanager
def _opened(source: str | Path | bytes, name: str) -> Iterator[tuple[Any, Any]]:
    """The open container and its first video stream; errors name ``name``."""
    av = _import_av()
    if not isinstance(source, bytes):
        require_file(Path(source))
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MedicalImageError(
            f"{name}: not a readable video file ({err}). Fix: send an mp4, mov, avi, webm or mkv file",
            "unreadable_image",
        ) from err
    try:
        if not container.streams.video:
            raise MedicalImageError(f"{name}: the file holds no video stream", "unreadable_image")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _stream_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and Fraction(rate) > 0:
            return float(rate)
    return None


def _header(container: Any, stream: Any, name: str) -> VolumeHeader:
    av = _import_av()
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width < 1 or height < 1:
        raise MedicalImageError(f"{name}: the video stream states no frame size", "unreadable_image")
    frames = int(stream.frames or 0)
    if frames < 1:  # not in the header (webm, some avi): count the packets, which decodes nothing
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        except av.FFmpegError as err:
            raise MedicalImageError(f"{name}: the video stream cannot be read ({err})", "unreadable_image") from err
    if frames < 1:
        raise MedicalImageError(f"{name}: the video holds no frame", "unreadable_image")
    return VolumeHeader(name, "clip", frames, height, width, 3, _stream_fps(stream))


def probe_video(source: str | Path | bytes, name: str | None = None) -> VolumeHeader:
    """Frame count, size and frame rate of a video, from its header (no frame decoded)."""
    name = name or str(source)
    with _opened(source, name) as (container, stream):
        return _header(container, stream, name)


def read_video(
    source: str | Path | bytes,
    name: str | None = None,
    frames: list[int] | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS,
    max_frames: int | None = None,
) -> Volume:
    """A video as a clip :class:`Volume` of RGB uint8 frames ``[N, H, W, 3]`` with the stream's frame rate.

    ``frames``: only these frame indices are converted (decoding stops after the last one). The limits apply to
    the frames kept and are checked from the header before decoding.
    """
    name = name or str(source)
    with _opened(source, name) as (container, stream):
        header = _header(container, stream, name)
        chosen = header.check(max_voxels, max_frames, frames)
        values = _decode(container, stream, chosen, header)
    return Volume(
        values=values,
        kind="clip",
        source=name,
        fps=header.fps,
        photometric="RGB",
        source_frames=None if frames is None else chosen,
    )


def _decode(container: Any, stream: Any, chosen: list[int], header: VolumeHeader) -> np.ndarray:
    """Decode in order, converting only the chosen frames; stop after the last one."""
    av = _import_av()
    values = np.empty((len(chosen), header.height, header.width, 3), dtype=np.uint8)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(chosen):
        slots.setdefault(index, []).append(slot)
    last, index = max(chosen), -1
    stream.thread_type = "AUTO"
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index in slots:
                rgb = frame.to_ndarray(format="rgb24")
                if rgb.shape != values.shape[1:]:
                    raise MedicalImageError(
                        f"{header.source}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the stream "
                        f"{header.width}x{header.height}: the size changes mid-stream. Fix: re-encode the video "
                        "at one size",
                        "unreadable_image",
                    )
                values[slots[index]] = rgb
            if index >= last:
                break
    except av.FFmpegError as err:
        raise MedicalImageError(
            f"{header.source}: the video cannot be decoded after frame {index} ({err})", "truncated_image"
        ) from err
    if index < last:
        raise MedicalImageError(
            f"{header.source}: the video ends after {index + 1} frame(s) but its header states {header.num_frames}; "
            "it is truncated. Fix: re-encode or re-send the file",
            "truncated_image",
        )
    return values
