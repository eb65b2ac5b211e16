"""Images named in chat requests: ``data:`` URLs, and local files only inside an allowed folder.

``http(s)://`` URLs are refused: the server never fetches from the network on a client's behalf. Local
paths (plain or ``file://``) are read only when the server was started with ``--allowed_local_media_path``
and the resolved path (symbolic links followed) lies inside that folder. DICOM and NIfTI files are read
through :mod:`citrus_v.media` (a path may carry ``#slice=40&window=ct-lung`` style options).
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

from PIL import Image

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
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError... for corrupt data
        raise MediaError(
            f"the image could not be decoded ({err}); send PNG, JPEG or DICOM data", "invalid_image", 400, param
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
    if mime in ("application/dicom", "application/dicom+binary") or data[128:132] == b"DICM":
        with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
            handle.write(data)
            handle.flush()
            return _read_medical(Path(handle.name), policy, param)
    return _open_raster(data, policy, param)


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
            raise MediaError(f"file URL with a host {parsed.netloc!r} is not local", "local_media_not_allowed", 400)
        path = unquote(parsed.path) + (f"#{parsed.fragment}" if parsed.fragment else "")
        return _from_local(path, policy, param)
    if scheme and len(scheme) > 1:  # a Windows drive letter is not a scheme
        raise MediaError(f"unsupported image URL scheme {scheme!r}", "invalid_image_url", 400, param)
    return _from_local(url, policy, param)
