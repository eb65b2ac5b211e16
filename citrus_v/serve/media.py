"""Images named in chat requests: ``data:`` URLs, bare base64, and local files only inside an allowed folder.

``http(s)://`` URLs are refused: the server never fetches from the network on a client's behalf. Local
paths (plain or ``file://``) are read only when the server was started with ``--allowed_local_media_path``
and the resolved path (symbolic links followed) lies inside that folder. DICOM and NIfTI files are read
through :mod:`citrus_v.media` (a path may carry ``#slice=40&window=ct-lung`` style options).

OpenAI's ``image_url`` parts take a URL (:func:`load_image_url`). ms-swift's ``image`` parts, which upstream
Citrus-V's clients send, take a URL, a path, or the image file's bytes as bare base64
(:func:`load_image_value`); every form goes through the same checks and limits.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..media.nifti import is_nifti

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class MediaError(Exception):
    """An image the server will not or cannot use; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param


@dataclass(frozen=True)
class MediaPolicy:
    """What the server accepts as an image."""

    allowed_local_media_path: Path | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def _check_size(width: int, height: int, policy: MediaPolicy, param: str | None) -> None:
    if width * height > policy.max_image_pixels:
        raise MediaError(
            f"the image is {width}x{height} = {width * height} pixels, over this server's limit of "
            f"{policy.max_image_pixels}; send a smaller image",
            "image_too_large",
            413,
            param,
        )


def _open_raster(data: bytes, policy: MediaPolicy, param: str | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            image = Image.open(io.BytesIO(data))
        _check_size(*image.size, policy, param)  # from the header, before decoding the pixels
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise MediaError(f"the image is too large to decode: {err}", "image_too_large", 413, param) from err
    except MediaError:
        raise
    except UnidentifiedImageError:  # Pillow's message names its in-memory buffer, not the request's image
        raise MediaError(
            "the image data is not PNG, JPEG, DICOM or NIfTI (.nii / .nii.gz), or is too damaged to tell; send one "
            "of those",
            "invalid_image",
            400,
            param,
        ) from None
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError... for corrupt data
        raise MediaError(
            f"the image could not be decoded ({err}); send PNG, JPEG, DICOM or NIfTI data", "invalid_image", 400, param
        ) from err


def _read_medical(ref, policy: MediaPolicy, param: str | None) -> Image.Image:
    """A path or ``MediaRef`` through the medical I/O module (DICOM, NIfTI slice, or any raster)."""
    from ..media import MedicalImageError, read_image

    try:
        return read_image(ref, max_pixels=policy.max_image_pixels)
    except MedicalImageError as err:
        status = 413 if err.reason == "image_too_large" else 400
        code = "image_too_large" if status == 413 else "invalid_image"
        raise MediaError(f"the image could not be read: {err}", code, status, param) from err


def _from_data_url(url: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError(
            "a data: URL image must be base64 encoded: data:image/png;base64,<data>", "invalid_image_url", 400, param
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"the data: URL is not valid base64 ({err})", "invalid_image", 400, param) from err
    mime = header[: -len(";base64")].split(";")[0].strip().lower()
    return _from_bytes(data, mime, policy, param)


def _from_bytes(data: bytes, mime: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    if mime in ("application/dicom", "application/dicom+binary") or data[128:132] == b"DICM":
        with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
            handle.write(data)
            handle.flush()
            return _read_medical(Path(handle.name), policy, param)
    if is_nifti(data):
        return _read_nifti_data(data, policy, param)
    return _open_raster(data, policy, param)


def _read_nifti_data(data: bytes, policy: MediaPolicy, param: str | None) -> Image.Image:
    """The middle slice of a NIfTI volume sent as bytes (one window for the whole volume)."""
    from ..media import MedicalImageError
    from ..media.nifti import read_nifti_bytes

    try:
        image = read_nifti_bytes(data, "the request's image", max_pixels=policy.max_image_pixels).picture()
    except MedicalImageError as err:
        status = 413 if err.reason == "image_too_large" else 400
        code = "image_too_large" if status == 413 else "invalid_image"
        raise MediaError(f"the image could not be read: {err}", code, status, param) from err
    _check_size(*image.size, policy, param)  # the volume passed its voxel limit; the slice meets the image one
    return image


def _from_local(text: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    from ..media import MedicalImageError, parse_ref

    if policy.allowed_local_media_path is None:
        raise MediaError(
            "local files are not served; send the image as a data: URL, or start the server with "
            "--allowed_local_media_path DIR",
            "local_media_not_allowed",
            400,
            param,
        )
    try:
        ref = parse_ref(text)
    except MedicalImageError as err:
        raise MediaError(str(err), "invalid_image_url", 400, param) from err
    allowed = policy.allowed_local_media_path.resolve()
    path = ref.path if ref.path.is_absolute() else allowed / ref.path
    resolved = path.resolve()
    if not resolved.is_relative_to(allowed):
        raise MediaError(
            f"{text!r} is outside the folder this server may read (--allowed_local_media_path)",
            "local_media_not_allowed",
            400,
            param,
        )
    if not resolved.is_file():
        raise MediaError(f"no such file under the allowed folder: {text!r}", "image_not_found", 400, param)
    ref.path = resolved
    return _read_medical(ref, policy, param)


def load_image_url(url: str, policy: MediaPolicy, param: str | None = None) -> Image.Image:
    """Resolve an ``image_url`` to an RGB PIL image, or raise :class:`MediaError` saying why not."""
    scheme = urlparse(url).scheme.lower()
    if url.startswith("data:"):
        return _from_data_url(url, policy, param)
    if scheme in ("http", "https", "ftp"):
        raise MediaError(
            "remote image URLs are refused: this server does not fetch from the network; send the image "
            "as a data: URL (base64)",
            "remote_media_not_allowed",
            400,
            param,
        )
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(
                f"file URL with a host {parsed.netloc!r} is not local", "local_media_not_allowed", 400, param
            )
        path = unquote(parsed.path) + (f"#{parsed.fragment}" if parsed.fragment else "")
        return _from_local(path, policy, param)
    if scheme and len(scheme) > 1:  # a Windows drive letter is not a scheme
        raise MediaError(f"unsupported image URL scheme {scheme!r}", "invalid_image_url", 400, param)
    return _from_local(url, policy, param)


# The first bytes of the image files a bare base64 string may hold (PNG, JPEG, GIF, BMP, TIFF, WebP); DICOM
# is recognised by its "DICM" marker after the 128-byte preamble.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _base64_bytes(value: str) -> bytes | None:
    """``value`` decoded as base64, or ``None`` when it is not base64."""
    compact = "".join(value.split())
    if len(compact) < 16 or len(compact) % 4:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_image_file(data: bytes) -> bool:
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(_SIGNATURES) or webp or data[128:132] == b"DICM" or is_nifti(data)


# base64 this long is not taken for a file name when it holds no image: it is reported as a bad image
_LONGEST_NAME = 255


def load_image_value(value: str, policy: MediaPolicy, param: str | None = None) -> Image.Image:
    """Resolve an ms-swift ``image`` part's value: a URL or path as :func:`load_image_url` does, or the image
    file's bytes as bare base64 (PNG, JPEG, GIF, BMP, TIFF, WebP or DICOM); raise :class:`MediaError` if neither."""
    if value.startswith("data:") or urlparse(value).scheme.lower() in ("http", "https", "ftp", "file"):
        return load_image_url(value, policy, param)
    data = _base64_bytes(value)
    if data is not None and _is_image_file(data):
        return _from_bytes(data, "", policy, param)
    if data is not None and len(value) > _LONGEST_NAME:
        raise MediaError(
            "the image is base64 but not of a PNG, JPEG, GIF, BMP, TIFF, WebP or DICOM file; send one of those",
            "invalid_image",
            400,
            param,
        )
    return load_image_url(value, policy, param)
