"""Volumes and clips named in chat requests: read as file bytes, measured from their headers, then decoded.

A video part (OpenAI-style ``video_url`` or ms-swift's ``video``) names a NIfTI file, a zip of DICOM slices, a
DICOM file (multi-frame: an enhanced CT/MR, an ultrasound cine loop) or a video file (mp4, webm...):

- as a ``data:`` URL (base64; the MIME type is not trusted: the bytes say what they are), or for ms-swift's part
  the file's bytes as bare base64;
- as a local path or ``file://`` URL, only under ``--allowed_local_media_path``, opened through
  :mod:`~citrus_v.serve.local_files` (no window between the check and the read); a folder is a DICOM series:
  each of its files opened the same way and read into one zip, which the series reader takes as it takes a sent
  zip. A path may carry the options of :mod:`citrus_v.media.volumes` (``#axis=1&window=ct-lung``,
  ``#series=UID``, ``#t=0``). ``http(s)://`` is refused: the server never fetches from the network.

:func:`fetch` gets the bytes (the sizes of local files are checked before they are read, against what a
source within the voxel limit can need), :func:`probe` reads only the headers (frames, frame size, samples, frame
rate) and :func:`decode` decodes every frame once the request as a whole has been checked and its memory
reserved. Every refusal is a :class:`~citrus_v.serve.media.MediaError` naming the part (``param``): 413
``video_too_large`` for a limit, 400 ``invalid_video`` for bytes that are no volume or clip.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlencode, urlparse

from ..media import MedicalImageError, Volume
from ..media.dicom_series import file_bytes_limit
from ..media.volume import VolumeHeader
from ..media.volumes import parse_volume_ref, probe_volume_bytes, read_volume_bytes
from ..media.windowing import Window
from .media import MediaError
from .media_urls import NotLocal, bare_base64, data_url_parts, file_url_path

if TYPE_CHECKING:
    from .messages import VideoSource

# A series folder may hold this many files beyond one per frame (a DICOMDIR, reports, thumbnails)
FOLDER_SPARE_FILES = 64
# qwen_vl_utils' default frame cap is 768; a CT of 1024 slices still fits
DEFAULT_MAX_VIDEO_FRAMES = 1024
# a 512 x 512 CT of 512 slices, all videos of a request together
DEFAULT_MAX_VIDEO_VOXELS = 2**27
# bare base64 this long is not taken for a file name when it holds no known file
_LONGEST_NAME = 255


@dataclass(frozen=True)
class VideoPolicy:
    """What the server accepts as a volume or clip: where local files may be, and the frames and voxels of all
    videos of one request together (checked from the headers before decoding)."""

    allowed_local_media_path: Path | None = None
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_voxels: int = DEFAULT_MAX_VIDEO_VOXELS

    @property
    def max_file_bytes(self) -> int:
        """The most bytes a local file (or a series folder's files together) may hold: what a source within the
        voxel limit can need (8 bytes a voxel and a header allowance, the media readers' own bound)."""
        return int(file_bytes_limit(self.max_voxels))


@dataclass
class VideoData:
    """One video's file bytes, not decoded, and the options its reference gave; ``name`` names it in messages."""

    data: bytes
    name: str
    axis: int | None = None
    t: int | None = None
    window: Window | None = None
    series: str | None = None


def _refusal(err: MedicalImageError, param: str) -> MediaError:
    """A media reader's refusal as the server's answer: 413 for a limit, else 400."""
    if getattr(err, "reason", None) == "image_too_large":
        return MediaError(f"the video is too large: {err}", "video_too_large", 413, param)
    return MediaError(f"the video could not be read: {err}", "invalid_video", 400, param)


def _unreadable(err: Exception, param: str) -> MediaError:
    """Any other failure of a reader on hostile bytes: a 400 naming what went wrong, never a 500."""
    return MediaError(
        f"the video could not be read ({type(err).__name__}: {err}); send a NIfTI file, a zip of DICOM slices, a "
        "DICOM file or a video file (mp4, webm)",
        "invalid_video",
        400,
        param,
    )


# --- fetching the bytes ---------------------------------------------------------------------------------------
def _from_data_url(url: str, param: str) -> VideoData:
    parts = data_url_parts(url)
    if parts is None:
        raise MediaError(
            "a data: URL video must be base64 encoded: data:application/gzip;base64,<data>",
            "invalid_image_url",
            400,
            param,
        )
    media_type, payload = parts
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"the data: URL is not valid base64 ({err})", "invalid_video", 400, param) from err
    name = f"the video at {param}"
    options = _data_url_options(media_type, param)
    if not options:
        return VideoData(data, name)
    try:
        ref = parse_volume_ref("video#" + urlencode(options))
    except (MedicalImageError, ValueError) as err:
        raise MediaError(f"the data: URL's options: {err}", "invalid_image_url", 400, param) from err
    return VideoData(data, name, ref.axis, ref.t, ref.window, ref.series)


# what a reference's fragment says (``ct.nii.gz#window=ct-abdomen``) travels in a data: URL as media-type
# parameters (RFC 2397): ``data:application/gzip;window=ct-abdomen;base64,...``
_DATA_URL_OPTIONS = ("axis", "t", "window", "series")
_IGNORED_PARAMETERS = ("charset", "name", "filename")


def _data_url_options(media_type: str, param: str) -> list[tuple[str, str]]:
    """The reference options among a data: URL's media-type parameters; an unknown parameter is refused."""
    options = []
    for part in media_type.split(";")[1:]:
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key in _IGNORED_PARAMETERS or not key:
            continue
        if key not in _DATA_URL_OPTIONS:
            raise MediaError(
                f"the data: URL has the parameter {key!r}; a video's data: URL may carry "
                f"{', '.join(_DATA_URL_OPTIONS)} (as a reference's #options: "
                "data:application/gzip;window=ct-abdomen;base64,...)",
                "invalid_image_url",
                400,
                param,
            )
        options.append((key, unquote(value)))
    return options


def _local_path_text(text: str, param: str) -> str:
    """A ``file://`` URL's path (with its fragment), or ``text`` itself."""
    if urlparse(text).scheme.lower() != "file":
        return text
    try:
        return file_url_path(text)
    except NotLocal as err:
        raise MediaError(str(err), "local_media_not_allowed", 400, param) from err


def _from_local(text: str, policy: VideoPolicy, param: str) -> VideoData:
    """A file or a DICOM series folder under the allowed folder, read through the safe opener."""
    from .local_files import LocalPathError, is_folder, open_inside

    allowed = policy.allowed_local_media_path
    if allowed is None:
        raise MediaError(
            "local files are not served; send the volume or clip as a data: URL, or start the server with "
            "--allowed_local_media_path DIR",
            "local_media_not_allowed",
            400,
            param,
        )
    shown = _local_path_text(text, param)
    try:
        ref = parse_volume_ref(shown)
    except (MedicalImageError, RuntimeError, ValueError) as err:  # RuntimeError: '~' with no home folder
        raise MediaError(str(err), "invalid_image_url", 400, param) from err
    try:
        fd, _name = open_inside(allowed, ref.path, shown, folder_ok=True)
        try:
            if is_folder(fd):
                data = _series_zip(allowed, ref.path, fd, shown, policy)
            else:
                data = _file_bytes(fd, shown, policy)
        finally:
            os.close(fd)
    except LocalPathError as err:
        raise MediaError(err.message, err.code, err.status, param) from err
    return VideoData(data, shown, ref.axis, ref.t, ref.window, ref.series)


def _file_bytes(fd: int, shown: str, policy: VideoPolicy) -> bytes:
    from .local_files import read_local_file

    return read_local_file(fd, shown, policy.max_file_bytes)


def _series_zip(allowed: Path, path: Path, fd: int, shown: str, policy: VideoPolicy) -> bytes:
    """The files of a series folder (sizes checked first) stored in one zip, each opened on its own."""
    from .local_files import LocalPathError, list_folder, read_folder_files

    listing = list_folder(fd, shown, policy.max_frames + FOLDER_SPARE_FILES)
    if listing.total_bytes > policy.max_file_bytes:
        raise LocalPathError(
            f"the {len(listing.names)} files of {shown!r} hold {listing.total_bytes} bytes, more than a series "
            f"within this server's voxel limit can need ({policy.max_file_bytes} bytes); send a smaller series",
            "video_too_large",
            413,
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in read_folder_files(allowed, path, listing.names, shown, policy.max_file_bytes):
            archive.writestr(name, data)
    return buffer.getvalue()


# the first bytes of the files a bare base64 value may hold besides NIfTI (gzip or not), zip and DICOM
_VIDEO_SIGNATURES = (b"\x1a\x45\xdf\xa3", b"OggS", b"RIFF", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV")


def _known_file(data: bytes) -> bool:
    from ..media.nifti import is_nifti

    return (
        is_nifti(data)
        or data[:4] == b"PK\x03\x04"
        or data[128:132] == b"DICM"
        or data[4:8] == b"ftyp"  # mp4, mov, m4v
        or data.startswith(_VIDEO_SIGNATURES)
    )


def fetch(source: VideoSource, policy: VideoPolicy) -> VideoData:
    """The bytes of one video part (see the module docstring), nothing decoded; raises :class:`MediaError`."""
    reference, param = source.reference, source.param
    if reference.startswith("data:"):
        return _from_data_url(reference, param)
    scheme = urlparse(reference).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise MediaError(
            "remote video URLs are refused: this server does not fetch from the network; send the volume or clip "
            "as a data: URL (base64)",
            "remote_media_not_allowed",
            400,
            param,
        )
    if source.swift_value and scheme != "file":
        data = bare_base64(reference)
        if data is not None and (_known_file(data) or len(reference) > _LONGEST_NAME):
            return VideoData(data, f"the video at {param}")
    if scheme and scheme != "file" and len(scheme) > 1:  # a Windows drive letter is not a scheme
        raise MediaError(f"unsupported video URL scheme {scheme!r}", "invalid_image_url", 400, param)
    return _from_local(reference, policy, param)


# --- headers and decoding -------------------------------------------------------------------------------------
def probe(video: VideoData, param: str) -> VolumeHeader:
    """Frames, frame size, samples and frame rate from the headers alone; raises :class:`MediaError`."""
    try:
        return probe_volume_bytes(video.data, video.name, axis=video.axis, series=video.series)
    except MedicalImageError as err:
        raise _refusal(err, param) from err
    except Exception as err:  # noqa: BLE001 - hostile bytes may break a reader in any way: a 400, not a 500
        raise _unreadable(err, param) from err


def decode(video: VideoData, header: VolumeHeader, param: str) -> Volume:
    """Every frame of the video, within the frames and voxels its header stated (a source that says more on a
    second reading is refused)."""
    try:
        return read_volume_bytes(
            video.data,
            video.name,
            axis=video.axis,
            t=video.t,
            window=video.window,
            series=video.series,
            max_voxels=header.voxels,
            max_frames=header.num_frames,
        )
    except MedicalImageError as err:
        raise _refusal(err, param) from err
    except Exception as err:  # noqa: BLE001 - see probe
        raise _unreadable(err, param) from err
