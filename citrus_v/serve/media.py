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
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from ..media.errors import DEFAULT_MAX_DECODED_BYTES
from ..media.nifti import is_nifti
from .media_urls import NotLocal, bare_base64, data_url_parts, file_url_path, mime_of

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class MediaError(Exception):
    """An image the server will not or cannot use; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param

    def rename(self, private: str, shown: str) -> None:
        """Name the image as the client did (``shown``), not by the server's own path to it (``private``)."""
        self.message = self.message.replace(private, shown)
        self.args = (self.message,)


@dataclass(frozen=True)
class MediaPolicy:
    """What the server accepts as an image."""

    allowed_local_media_path: Path | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES  # one image's whole container, decoded


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
    """PNG, JPEG, GIF, TIFF, WebP... bytes to RGB: the header is checked (the first frame's pixels, every
    frame's decoded bytes, the pieces it is stored in), then the first frame alone is decoded."""
    from ..media import MedicalImageError
    from ..media.raster import check_raster

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            image = Image.open(io.BytesIO(data))
        _check_size(*image.size, policy, param)  # from the header, before decoding the pixels
        check_raster(image, "the image", policy.max_image_pixels, policy.max_decoded_bytes)
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise MediaError(f"the image is too large to decode: {err}", "image_too_large", 413, param) from err
    except MedicalImageError as err:
        raise _refusal(err, param) from err
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
        return read_image(ref, max_pixels=policy.max_image_pixels, max_bytes=policy.max_decoded_bytes)
    except MedicalImageError as err:
        raise _refusal(err, param) from err


def _refusal(err: Exception, param: str | None) -> MediaError:
    """A media reader's :class:`~citrus_v.media.MedicalImageError` as the server's answer: 413 for a limit,
    else 400."""
    status = 413 if getattr(err, "reason", None) == "image_too_large" else 400
    code = "image_too_large" if status == 413 else "invalid_image"
    return MediaError(f"the image could not be read: {err}", code, status, param)


def _from_data_url(url: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    parts = data_url_parts(url)
    if parts is None:
        raise MediaError(
            "a data: URL image must be base64 encoded: data:image/png;base64,<data>", "invalid_image_url", 400, param
        )
    media_type, payload = parts
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"the data: URL is not valid base64 ({err})", "invalid_image", 400, param) from err
    return _from_bytes(data, mime_of(media_type), policy, param)


def _from_bytes(data: bytes, mime: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    if mime in ("application/dicom", "application/dicom+binary") or data[128:132] == b"DICM":
        with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
            handle.write(data)
            handle.flush()
            try:
                return _read_medical(Path(handle.name), policy, param)
            except MediaError as err:
                err.rename(handle.name, "the request's image")
                raise
    if is_nifti(data):
        return _read_nifti_data(data, policy, param)
    return _open_raster(data, policy, param)


def _read_nifti_data(data: bytes, policy: MediaPolicy, param: str | None) -> Image.Image:
    """The middle slice of a NIfTI volume sent as bytes (one window for the whole volume)."""
    from ..media import MedicalImageError
    from ..media.nifti import read_nifti_bytes

    try:
        volume = read_nifti_bytes(
            data, "the request's image", max_pixels=policy.max_image_pixels, max_bytes=policy.max_decoded_bytes
        )
        image = volume.picture()
    except MedicalImageError as err:
        raise _refusal(err, param) from err
    _check_size(*image.size, policy, param)  # the volume passed its voxel limit; the slice meets the image one
    return image


def _from_local(text: str, policy: MediaPolicy, param: str | None) -> Image.Image:
    """A file under the allowed folder, opened without a window between the check and the read (see
    :mod:`citrus_v.serve.local_files`); the reference's options (``#slice=40&window=ct-lung``) apply."""
    from dataclasses import replace

    from ..media import MedicalImageError, parse_ref
    from ..media.nifti import read_nifti_bytes
    from .local_files import LocalPathError, map_file, opened_local_file

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
    except (MedicalImageError, RuntimeError) as err:  # RuntimeError: '~' with no home folder to expand it to
        raise MediaError(str(err), "invalid_image_url", 400, param) from err
    try:
        with opened_local_file(policy.allowed_local_media_path, ref.path, text) as private:
            opened = replace(ref, path=private)
            try:
                if opened.kind != "nifti":
                    return _read_medical(opened, policy, param)
                # from its bytes: the path reader would open the file again by its real name
                data = map_file(private)
                volume = read_nifti_bytes(data, text, opened.t, policy.max_image_pixels, policy.max_decoded_bytes)
                axis = 2 if opened.axis is None else opened.axis
                image = volume.picture(opened.slice, axis, opened.window)
            except MedicalImageError as err:
                raise _refusal(err, param) from err
            except MediaError as err:
                err.rename(str(private), text)
                raise
            _check_size(*image.size, policy, param)
            return image
    except LocalPathError as err:
        raise MediaError(err.message, err.code, err.status, param) from err


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
        try:
            path = file_url_path(url)
        except NotLocal as err:
            raise MediaError(str(err), "local_media_not_allowed", 400, param) from err
        return _from_local(path, policy, param)
    if scheme and len(scheme) > 1:  # a Windows drive letter is not a scheme
        raise MediaError(f"unsupported image URL scheme {scheme!r}", "invalid_image_url", 400, param)
    return _from_local(url, policy, param)


# The first bytes of the image files a bare base64 string may hold (PNG, JPEG, GIF, BMP, TIFF, WebP); DICOM
# is recognised by its "DICM" marker after the 128-byte preamble.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


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
    data = bare_base64(value)
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
