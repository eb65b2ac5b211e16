"""A whole volume or clip as the server is sent it: the uploaded file's bytes in one ``data:`` URL, for the one
``video_url`` part of the question (:meth:`citrus_v.app.client.ApiClient.ask_volume`).

The server tells the formats apart by their contents; the media type only names them (NIfTI, a zip of DICOM
slices, a DICOM file, a video). A 4-D NIfTI file is sent as the 3-D volume of the time point on screen, on the
file's own grid (nibabel's slicer keeps the affine and the header's units), because a volume sent as bytes is read
at its first time point.
"""

from __future__ import annotations

import base64
import gzip
import mimetypes
from pathlib import Path

from .scan import Scan

NIFTI_GZIP_MAGIC = b"\x1f\x8b"
MEDIA_TYPES = {"series": "application/zip", "dicom": "application/dicom"}
FALLBACK_VIDEO_TYPE = "video/mp4"


def volume_bytes(scan: Scan, t: int = 0) -> tuple[bytes, str]:
    """The bytes sent for ``scan`` (time point ``t`` of a 4-D NIfTI file) and their media type."""
    if scan.kind == "nifti" and scan.time_points > 1:
        return _time_point_nifti(scan.path, t), "application/gzip"
    data = scan.path.read_bytes()
    if scan.kind == "nifti":
        return data, "application/gzip" if data[:2] == NIFTI_GZIP_MAGIC else "application/octet-stream"
    if scan.kind == "video":
        return data, mimetypes.guess_type(scan.path.name)[0] or FALLBACK_VIDEO_TYPE
    return data, MEDIA_TYPES.get(scan.kind, "application/octet-stream")


def volume_data_url(scan: Scan, t: int = 0) -> str:
    """``data:TYPE;base64,...`` of :func:`volume_bytes`."""
    data, media_type = volume_bytes(scan, t)
    return f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")


def _time_point_nifti(path: Path, t: int) -> bytes:
    """Time point ``t`` of a 4-D NIfTI file as a gzipped single-file NIfTI of the same class (NIfTI-1 or -2)."""
    import nibabel as nib

    image = nib.load(path)
    count = int(image.shape[3]) if len(image.shape) > 3 else 1
    if not 0 <= t < count:
        raise ValueError(f"{path.name}: time point {t + 1} does not exist; the file has {count}")
    return gzip.compress(image.slicer[..., t].to_bytes(), compresslevel=6)
