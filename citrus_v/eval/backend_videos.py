"""Volumes and clips for the backends: the reference a sample's video is sent as, and the mask stacks read back.

A ``seg3d`` (or 3-D ``absent``) sample names its video by a reference relative to its dataset
(``vol_00003.nii.gz#window=ct-abdomen``, ``series_folder/``, ``cine.dcm``, ``clip.mp4``). Both backends answer
with one boolean ``[N, H, W]`` stack per ``[SEG]`` on the video's whole grid (``N`` frames of ``H`` x ``W``, as
:func:`citrus_v.media.probe_volume` reads the reference), which the ``seg3d`` scorer compares with the label
volumes:

- **in-process**: the predictor's :class:`~citrus_v.infer.results.VolumeMask` per ``[SEG]`` holds a mask for each
  frame SAM 2 segmented, with the source frame it is (:attr:`~citrus_v.infer.results.VolumeMask.source_frames`);
  each goes to its place in the stack.
- **OpenAI API**: the video travels as a ``data:`` URL (:func:`video_data_url`): a NIfTI file's bytes, a DICOM
  series (a folder or zip) zipped on the fly with the chosen series' instances only, a multi-frame DICOM's or a
  video file's bytes. Options that cannot travel inside the bytes (``window``, ``axis``, ``t``) go as the data
  URL's media-type parameters (RFC 2397: ``data:application/gzip;window=ct-abdomen;base64,...``). The answer's
  ``grounding.volume_masks`` give each mask's frames with their COCO RLE (:func:`stacks_from_grounding`); a
  ``grounding.video_size`` other than the grid read here fails the sample (:func:`check_video_size`).

A frame index outside the video, or a frame mask of another size than the video's frames, is an error naming
both (the sample then fails), never a silently shifted or cropped mask.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..media import VolumeHeader, probe_volume, rle_to_mask
from ..media.dicom_series import collect_series
from ..media.volumes import VolumeRef, parse_volume_ref, source_format
from .samples import EvalSample

# Media types of the data URLs, by what the source is (a video file's comes from its name).
NIFTI_GZIP_TYPE = "application/gzip"
NIFTI_TYPE = "application/octet-stream"
ZIP_TYPE = "application/zip"
DICOM_TYPE = "application/dicom"
VIDEO_FALLBACK_TYPE = "video/mp4"


def video_reference(sample: EvalSample, ref: Any) -> str | dict[str, Any]:
    """``ref`` with a relative path made absolute against the sample's folder, its options kept (what the
    predictor's video reader and :func:`~citrus_v.media.probe_volume` take)."""
    if isinstance(ref, Mapping):
        resolved = dict(ref)
        resolved["path"] = _absolute(str(ref.get("path", "")), sample.base_dir)
        return resolved
    return _absolute(str(ref), sample.base_dir)


def video_references(sample: EvalSample) -> list[str | dict[str, Any]]:
    """Every video of ``sample``, resolved (see :func:`video_reference`)."""
    return [video_reference(sample, ref) for ref in sample.videos]


def video_grid(sample: EvalSample) -> VolumeHeader:
    """Frames and frame size of the sample's first video, from its headers: the grid its mask stacks are on."""
    return probe_volume(video_reference(sample, sample.videos[0]))


def place_frames(frames: Iterable[tuple[int, np.ndarray]], grid: VolumeHeader, where: str) -> np.ndarray:
    """A boolean ``[N, H, W]`` stack on ``grid`` with each ``(frame index, [H, W] mask)`` at its index; frames not
    given stay empty. ``where`` names the mask in errors."""
    shape = (grid.num_frames, grid.height, grid.width)
    stack = np.zeros(shape, dtype=bool)
    for index, mask in frames:
        index = int(index)
        if not 0 <= index < shape[0]:
            raise ValueError(
                f"{where}: frame {index} is outside the video, which has {shape[0]} frames (0..{shape[0] - 1})"
            )
        if tuple(mask.shape) != shape[1:]:
            raise ValueError(
                f"{where}: the mask of frame {index} is {mask.shape[0]}x{mask.shape[1]} (rows x columns) but the "
                f"video's frames are {shape[1]}x{shape[2]}"
            )
        stack[index] |= np.asarray(mask, dtype=bool)
    return stack


def stacks_from_volume_masks(volume_masks: Sequence[Any], grid: VolumeHeader) -> list[np.ndarray]:
    """The predictor's :class:`~citrus_v.infer.results.VolumeMask` list as stacks on ``grid`` (one per ``[SEG]``)."""
    return [
        place_frames(zip(mask.source_frames, mask.mask, strict=True), grid, f"volume mask {k}")
        for k, mask in enumerate(volume_masks)
    ]


def grounding_volume_masks(grounding: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The per-``[SEG]`` volume masks of a ``grounding`` object in answer order; ``None`` when it has none.

    ``volume_masks`` is where ``citrus-v deploy`` puts them; objects in ``masks`` that carry ``frames`` are read
    the same way (a server that lists 2-D and 3-D masks together)."""
    listed = grounding.get("volume_masks")
    if not isinstance(listed, list):
        listed = [m for m in grounding.get("masks") or [] if isinstance(m, Mapping) and "frames" in m] or None
    if listed is None:
        return None
    return sorted(listed, key=lambda m: int(m.get("index", 0))) if all("index" in m for m in listed) else listed


def check_video_size(grounding: Mapping[str, Any], grid: VolumeHeader) -> None:
    """The grounding's ``video_size`` (when the server gives one) must be the grid read here: another size means
    the server read the video otherwise (another axis, another series), and its frames would land on wrong ones."""
    size = grounding.get("video_size")
    if not isinstance(size, Mapping):
        return
    stated = (size.get("frames"), size.get("height"), size.get("width"))
    if stated != (grid.num_frames, grid.height, grid.width):
        raise ValueError(
            f"grounding.video_size is {stated[0]} frames of {stated[1]}x{stated[2]} but the video sent is "
            f"{grid.num_frames} frames of {grid.height}x{grid.width} (rows x columns): the server read it along "
            "another axis or as another series"
        )


def stacks_from_grounding(volume_masks: Sequence[Mapping[str, Any]], grid: VolumeHeader) -> list[np.ndarray]:
    """Each grounding volume mask's frames (``[{"frame": k, "rle": COCO RLE}]``) decoded into a stack on ``grid``."""
    stacks = []
    for k, entry in enumerate(volume_masks):
        where = f"grounding volume mask {k}"
        frames = entry.get("frames") or []
        if not isinstance(frames, list):
            raise ValueError(f"{where}: 'frames' must be a list of {{'frame', 'rle'}} objects")
        decoded = [
            (int(item["frame"]), rle_to_mask(item["rle"], image_size=(grid.width, grid.height)))
            for item in frames
        ]
        stacks.append(place_frames(decoded, grid, where))
    return stacks


def video_data_url(ref: str | Mapping[str, Any]) -> str:
    """A resolved video reference as a ``data:`` URL (see the module docstring)."""
    parsed = parse_volume_ref(ref)
    kind = source_format(parsed.path)
    if kind == "dicom_series":
        data, mime = _series_bytes(parsed)
    else:
        data, mime = parsed.path.read_bytes(), _media_type(kind, parsed.path)
    return f"data:{mime}{_parameters(parsed)};base64," + base64.b64encode(data).decode("ascii")


def _series_bytes(parsed: VolumeRef) -> tuple[bytes, str]:
    """The chosen series of a folder or zip: one multi-frame instance as it is, else its instances zipped."""
    with collect_series(parsed.path, series=parsed.series) as files:
        if files.single_multiframe:
            with files.slices[0].opener() as handle:
                return handle.read(), DICOM_TYPE
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for number, item in enumerate(files.slices):
                with item.opener() as handle:
                    archive.writestr(f"{number:05d}.dcm", handle.read())
    return buffer.getvalue(), ZIP_TYPE


def _media_type(kind: str, path: Path) -> str:
    if kind == "nifti":
        return NIFTI_GZIP_TYPE if path.name.lower().endswith(".gz") else NIFTI_TYPE
    if kind == "dicom":
        return DICOM_TYPE
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed if guessed and guessed.startswith("video/") else VIDEO_FALLBACK_TYPE


def _parameters(parsed: VolumeRef) -> str:
    """``;window=40%2C400;axis=1;t=0`` for the options the reference sets (none: empty)."""
    options = []
    if parsed.window is not None:
        options.append(("window", f"{parsed.window.center:g},{parsed.window.width:g}"))
    if parsed.axis is not None:
        options.append(("axis", str(parsed.axis)))
    if parsed.t is not None:
        options.append(("t", str(parsed.t)))
    return "".join(f";{name}={quote(value, safe='')}" for name, value in options)


def _absolute(text: str, base_dir: Path | None) -> str:
    """``text`` (a path with an optional ``#options`` fragment) against ``base_dir`` when it is relative."""
    path = Path(text).expanduser()
    if base_dir is None or path.is_absolute():
        return str(path) if text.startswith("~") else text
    return str(Path(base_dir) / path)
