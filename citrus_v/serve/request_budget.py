"""A request's images measured from their headers, and the request-wide limits checked before any pixel is decoded.

:func:`read_headers` reads, for every image of a request, only what its container says about it: a PNG/JPEG/TIFF
header through Pillow's lazy ``Image.open``, a DICOM file's attributes up to group 0028 (a deflated data set is
inflated only as far as that, never whole), a NIfTI header (a gzipped one inflated only for its first bytes).
:func:`check_images` then applies the limits that concern the whole request (how many images, how many pixels
in all), :func:`count_tokens` counts the prompt as the model will see it (each image's tokens after the
processor's smart resize, the chat template's text around them; a video's tokens as
:mod:`~citrus_v.serve.video_budget` counts them) against the context, and :meth:`MemoryModel.estimate` gives the
memory the request will hold while it is decoded and served (its images, and its volumes and clips as
:class:`VideoFootprint`), which the server reserves (:mod:`~citrus_v.serve.admission`) before it decodes anything.

A reference whose header cannot be read here (a remote URL, a local path outside the allowed folder, a damaged
container) goes to the decoder straight away: the decoder refuses it with its own status and code before it
decodes a pixel, or, should it read the image after all, the image is counted at the size it decoded to, under
the per-image limit the decoder applies.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from ..media import MedicalImageError, parse_ref
from ..media.nifti import is_nifti
from .errors import ApiError
from .media import MediaError, MediaPolicy
from .media_urls import NotLocal, bare_base64, data_url_parts, file_url_path, mime_of

if TYPE_CHECKING:
    from .messages import ImageSource

# A DICOM data set is read up to its image attributes (group 0028); a deflated one is inflated at most this far.
DICOM_HEADER_BYTES = 4 * 1024 * 1024
# the NIfTI-2 header is 540 bytes, NIfTI-1's 348; 544 covers both with the extension flag
_NIFTI_HEADER_BYTES = 544
_NIFTI1_MAGIC, _NIFTI2_MAGIC = b"n+1\0", b"n+2\0"
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 64 * 1024
_DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
_DICOM_MIMES = ("application/dicom", "application/dicom+binary")
_FLOAT_BYTES = 8  # the DICOM reader's modality values are float64

DEFAULT_MAX_IMAGES_PER_REQUEST = 16
DEFAULT_MAX_REQUEST_PIXELS = 2 * 4096 * 4096

Loader = Callable[["ImageSource"], Image.Image]


@dataclass(frozen=True)
class ImageHeader:
    """What a container says about one image before decoding: the picture's ``width`` × ``height`` (what the
    processor gets) and ``decoded_bytes``, what the reader decodes on the way besides the picture (one DICOM
    frame's stored and float values, a NIfTI volume's voxels)."""

    width: int
    height: int
    decoded_bytes: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class MeasuredImage:
    """One image of a request: its source, its header, and the image itself when it had to be decoded to be
    measured (see the module docstring)."""

    source: ImageSource
    header: ImageHeader
    decoded: Image.Image | None = None

    def load(self, loader: Loader) -> Image.Image:
        """The decoded image: the one decoded while measuring, else decoded now through ``loader``."""
        image, self.decoded = self.decoded, None
        return image if image is not None else loader(self.source)


# --- reading headers ------------------------------------------------------------------------------------------
class _Unmeasured(Exception):
    """This reference has no header to read here; the decoder decides what it is."""


def _refused(message: str, param: str, code: str = "invalid_image", status: int = 400) -> MediaError:
    return MediaError(message, code, status, param)


def _check_image_pixels(header: ImageHeader, policy: MediaPolicy, param: str) -> ImageHeader:
    """The per-image limit, from the header (the decoder applies it again)."""
    if header.pixels > policy.max_image_pixels:
        raise _refused(
            f"the image is {header.width}x{header.height} = {header.pixels} pixels, over this server's limit of "
            f"{policy.max_image_pixels} per image (--max_image_pixels); send a smaller image",
            param,
            "image_too_large",
            413,
        )
    return header


def _raster_header(stream: IO[bytes], param: str) -> ImageHeader:
    """A raster's size from Pillow's lazy open (the header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the server's own limits apply
            with Image.open(stream) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        raise _refused(f"the image is too large to decode: {err}", param, "image_too_large", 413) from err
    except UnidentifiedImageError:
        raise _refused(
            "the image data is not PNG, JPEG, DICOM or NIfTI (.nii / .nii.gz), or is too damaged to tell; send one "
            "of those",
            param,
        ) from None
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError... for a damaged header
        raise _refused(
            f"the image header could not be read ({err}); send PNG, JPEG, DICOM or NIfTI data", param
        ) from err
    return ImageHeader(int(width), int(height))


def _inflated_prefix(stream: IO[bytes], limit: int, wbits: int) -> bytes:
    """The first ``limit`` bytes of a deflate (``wbits`` < 0) or gzip stream, reading the input in chunks."""
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    while len(out) < limit:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            break
        out += inflater.decompress(chunk, limit - len(out))
        if inflater.eof:
            break
    return bytes(out)


def _past_image_attributes(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) > 0x0028FFFF


def _dicom_dataset(stream: IO[bytes]) -> Any:
    """The DICOM data set up to its image attributes (group 0028); a deflated one inflated only that far."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import UID

    read_preamble(stream, False)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: int(tag) >> 16 != 2)
    syntax = UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    if syntax == _DEFLATED_SYNTAX:
        body = DicomBytesIO(_inflated_prefix(stream, DICOM_HEADER_BYTES, -zlib.MAX_WBITS))
        return read_dataset(body, False, True, stop_when=_past_image_attributes)
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    return read_dataset(stream, implicit, little, stop_when=_past_image_attributes)


def _dicom_header(stream: IO[bytes], param: str) -> ImageHeader:
    """A DICOM frame's size, and the bytes one decoded frame takes, from the attributes before the pixels."""
    try:
        ds = _dicom_dataset(stream)
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except Exception as err:  # pydicom raises many types for a damaged or truncated header
        raise _refused(
            f"the DICOM header could not be read up to its image attributes (Rows, Columns) within "
            f"{DICOM_HEADER_BYTES} bytes ({type(err).__name__}: {err}); send a complete DICOM file",
            param,
        ) from err
    if rows < 1 or columns < 1:
        raise _refused(f"the DICOM file says it is {columns}x{rows} pixels; it holds no image", param)
    frame = rows * columns * (samples * math.ceil(bits / 8) + _FLOAT_BYTES)
    return ImageHeader(columns, rows, frame)


def _nifti_head(stream: IO[bytes]) -> bytes:
    first = stream.read(_READ_CHUNK)
    if first[:2] != _GZIP_MAGIC:
        return first[:_NIFTI_HEADER_BYTES]
    return _inflated_prefix(io.BytesIO(first + stream.read(_READ_CHUNK)), _NIFTI_HEADER_BYTES, 16 + zlib.MAX_WBITS)


def _display_size(shape: Sequence[int], affine: Any, axis: int) -> tuple[int, int]:
    """``(width, height)`` of a slice along RAS+ ``axis`` (as the NIfTI reader shows it); file order when the
    affine gives no orientation (the reader then refuses the file itself)."""
    import numpy as np
    from nibabel.orientations import io_orientation

    dims = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    try:
        ornt = io_orientation(np.asarray(affine, dtype=np.float64))
        canonical = [0, 0, 0]
        for src, (dst, _flip) in enumerate(ornt):
            canonical[int(dst)] = dims[src]
        dims = canonical
    except (ValueError, np.linalg.LinAlgError, IndexError):
        pass
    rest = [dims[k] for k in range(3) if k != axis]
    return int(rest[0]), int(rest[1])


def _nifti_header(stream: IO[bytes], param: str, axis: int = 2) -> ImageHeader:
    """A NIfTI slice's display size, and the bytes of the voxels the reader decodes, from the header."""
    import nibabel as nib

    head = _nifti_head(stream)
    kind = nib.Nifti2Image if head[4:8] == _NIFTI2_MAGIC else nib.Nifti1Image
    try:
        header = kind.header_class(head[: kind.header_class.template_dtype.itemsize], check=False)
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        affine = header.get_best_affine()
    except Exception as err:  # nibabel raises varied types for a damaged header
        raise _refused(f"the NIfTI header could not be read ({err}); send a .nii or .nii.gz file", param) from err
    if not shape or any(s < 1 for s in shape):
        raise _refused(f"the NIfTI volume has no voxels (shape {shape})", param)
    width, height = _display_size(shape, affine, axis)
    # the raw voxels and the reoriented array the reader keeps
    return ImageHeader(width, height, 2 * math.prod(shape) * itemsize)


def nifti_value_bytes(data: bytes) -> int:
    """Bytes of one voxel as the NIfTI reader gives it, from the header: the stored type's, or 8 when the header
    scales the values (read as float64); 8 for a header that cannot be read (the reader then refuses it)."""
    import nibabel as nib

    head = _nifti_head(io.BytesIO(data))
    kind = nib.Nifti2Image if head[4:8] == _NIFTI2_MAGIC else nib.Nifti1Image
    try:
        header = kind.header_class(head[: kind.header_class.template_dtype.itemsize], check=False)
        slope, inter = header.get_slope_inter()
        itemsize = int(header.get_data_dtype().itemsize)
    except Exception:  # noqa: BLE001 - a damaged header: the widest value, the reader says what is wrong
        return _FLOAT_BYTES
    scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
    return _FLOAT_BYTES if scaled else max(itemsize, 1)


def _bytes_header(data: bytes, mime: str, param: str) -> ImageHeader:
    stream = io.BytesIO(data)
    if mime in _DICOM_MIMES or data[128:132] == b"DICM":
        return _dicom_header(stream, param)
    if is_nifti(data):
        return _nifti_header(stream, param)
    return _raster_header(stream, param)


def _data_url_header(url: str, param: str) -> ImageHeader:
    parts = data_url_parts(url)
    if parts is None:
        raise _Unmeasured  # the decoder says how a data: URL must look
    media_type, payload = parts
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _refused(f"the data: URL is not valid base64 ({err})", param) from err
    return _bytes_header(data, mime_of(media_type), param)


def _local_reference(text: str, policy: MediaPolicy) -> Any:
    """The ``MediaRef`` of a local path or ``file://`` URL, else :class:`_Unmeasured` (no allowed folder, a
    remote host, a reference that does not parse: the decoder refuses those with their own codes)."""
    if policy.allowed_local_media_path is None:
        raise _Unmeasured
    if urlparse(text).scheme.lower() == "file":
        try:
            text = file_url_path(text)
        except NotLocal as err:
            raise _Unmeasured from err
    try:
        return parse_ref(text)
    except (MedicalImageError, OSError, ValueError, RuntimeError) as err:
        raise _Unmeasured from err


def _local_header(text: str, policy: MediaPolicy, param: str) -> ImageHeader:
    """A file under the allowed folder, opened as the decoder opens it (:mod:`~citrus_v.serve.local_files`:
    no symbolic link out of the folder, no window between check and use); anything it refuses is left to the
    decoder, which refuses it the same way with its code."""
    from dataclasses import replace

    from .local_files import LocalPathError, opened_local_file

    ref = _local_reference(text, policy)
    try:
        with opened_local_file(policy.allowed_local_media_path, ref.path, text) as private:
            opened = replace(ref, path=private)
            kind = opened.kind
            with open(private, "rb") as stream:
                if kind == "dicom":
                    return _dicom_header(stream, param)
                if kind == "nifti":
                    return _nifti_header(stream, param, 2 if opened.axis is None else int(opened.axis))
                return _raster_header(stream, param)
    except (LocalPathError, MedicalImageError, OSError, ValueError, RuntimeError) as err:
        raise _Unmeasured from err


def _url_header(url: str, policy: MediaPolicy, param: str) -> ImageHeader:
    if url.startswith("data:"):
        return _data_url_header(url, param)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file" or not scheme or len(scheme) == 1:  # a Windows drive letter is not a scheme
        return _local_header(url, policy, param)
    raise _Unmeasured  # remote or unknown schemes: refused by the decoder


def _base64_image(value: str) -> bytes | None:
    """``value`` as the bytes of an image file sent as bare base64, else ``None``."""
    data = bare_base64(value)
    if data is None:
        return None
    if data[128:132] == b"DICM" or is_nifti(data):
        return data
    try:
        with Image.open(io.BytesIO(data)):
            return data
    except Exception:  # noqa: BLE001 - not an image Pillow knows: a name, or base64 of something else
        return None


def _value_header(value: str, policy: MediaPolicy, param: str) -> ImageHeader:
    """An ms-swift ``image`` value: a URL or path, or the image file's bytes as bare base64."""
    if value.startswith("data:") or urlparse(value).scheme.lower() in ("http", "https", "ftp", "file"):
        return _url_header(value, policy, param)
    data = _base64_image(value)
    if data is not None:
        return _bytes_header(data, "", param)
    return _url_header(value, policy, param)


def read_header(source: ImageSource, policy: MediaPolicy) -> ImageHeader | None:
    """``source``'s header, checked against the per-image limit; ``None`` when it has none to read here.

    Raises :class:`MediaError` for an image refused from its header."""
    read = _value_header if source.swift_value else _url_header
    try:
        header = read(source.reference, policy, source.param)
    except _Unmeasured:
        return None
    return _check_image_pixels(header, policy, source.param)


def read_headers(sources: Sequence[ImageSource], policy: MediaPolicy, loader: Loader) -> list[MeasuredImage]:
    """Every image of a request measured from its header; one without a header readable here goes through
    ``loader`` (which refuses it, or decodes it under its per-image limit) and is measured as decoded."""
    measured = []
    for source in sources:
        header = read_header(source, policy)
        if header is not None:
            measured.append(MeasuredImage(source, header))
            continue
        image = loader(source)
        measured.append(MeasuredImage(source, ImageHeader(*image.size), decoded=image))
    return measured


# --- the request-wide limits --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestLimits:
    """The limits on all images of one request together (the per-image limit is the media policy's)."""

    max_images: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_pixels: int = DEFAULT_MAX_REQUEST_PIXELS


def check_image_count(count: int, limits: RequestLimits) -> None:
    """Refuse a request with more images than ``limits.max_images`` (413 ``too_many_images``)."""
    if count > limits.max_images:
        raise ApiError(
            413,
            f"the request holds {count} images, over this server's limit of {limits.max_images} per request "
            "(--max_images_per_request); send fewer images per request",
            "too_many_images",
            param="messages",
        )


def check_images(images: Sequence[MeasuredImage], limits: RequestLimits) -> None:
    """Refuse a request whose images together pass ``limits.max_pixels`` (413 ``request_pixels_exceeded``)."""
    check_image_count(len(images), limits)
    total = sum(image.header.pixels for image in images)
    if total > limits.max_pixels:
        sizes = ", ".join(f"{m.header.width}x{m.header.height}" for m in images[:8])
        more = f" and {len(images) - 8} more" if len(images) > 8 else ""
        raise ApiError(
            413,
            f"the request's {len(images)} images hold {total} pixels in all ({sizes}{more}), over this server's "
            f"limit of {limits.max_pixels} per request (--max_request_pixels); send fewer or smaller images",
            "request_pixels_exceeded",
            param="messages",
        )


# --- tokens -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTokens:
    """The prompt as the model sees it: ``image`` tokens (each image's merged patches and its two vision
    markers), ``video`` tokens (the same for each video's sampled frames) and ``text`` tokens (the chat
    template's and the messages')."""

    text: int
    image: int
    per_image: tuple[int, ...] = ()
    video: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.video


def image_tokens(processor: Any, width: int, height: int, param: str = "messages") -> int:
    """The ``<|image_pad|>`` tokens one ``width`` × ``height`` image costs after the processor's smart resize
    (its ``min_pixels``/``max_pixels``, patch and merge size): one per merged patch."""
    from ..processing.boxes import model_size

    patch = int(processor.image_processor.patch_size)
    merge = int(processor.image_processor.merge_size)
    try:
        resized_w, resized_h = model_size(width, height, processor.min_pixels, processor.max_pixels, patch, merge)
    except ValueError as err:  # transformers' smart resize refuses aspect ratios over 200
        raise ApiError(
            400, f"the {width}x{height} image cannot be resized for the model: {err}", "invalid_image", param=param
        ) from err
    return (resized_w // (patch * merge)) * (resized_h // (patch * merge))


def count_tokens(
    processor: Any,
    messages: list[dict],
    system: str | None,
    images: Sequence[ImageHeader],
    video_pads: Sequence[int] = (),
) -> PromptTokens:
    """The prompt's tokens exactly as the predictor will build it (the same chat template, the generation
    prompt, each image and video expanded to its tokens: ``video_pads`` per video, see
    :func:`~citrus_v.serve.video_budget.video_tokens`), split into image, video and text tokens."""
    pads = [image_tokens(processor, header.width, header.height) for header in images]
    encoded = processor.template.encode(
        messages, pads, system=system, add_generation_prompt=True, video_tokens=list(video_pads)
    )
    image = sum(pads) + 2 * len(pads)  # each image's pads between its vision start and end markers
    video = sum(video_pads) + 2 * len(video_pads)
    return PromptTokens(
        text=len(encoded.input_ids) - image - video, image=image, per_image=tuple(p + 2 for p in pads), video=video
    )


def check_context(
    tokens: PromptTokens, max_tokens: int, context_length: int | None, images: int, videos: int = 0
) -> None:
    """Refuse a prompt whose image, video and text tokens, with ``max_tokens`` to generate, pass the context
    (400 ``context_length_exceeded``, naming each part)."""
    if context_length is None or tokens.total + max_tokens <= context_length:
        return
    fix = "shorten the messages or lower max_tokens"
    if images:
        fix = "send fewer or smaller images, " + fix
    if videos:
        fix = "send fewer videos or lower the frames the model sees (FPS_MAX_FRAMES, VIDEO_MAX_PIXELS), " + fix
    shown = f" and {tokens.video} video tokens ({videos} videos)" if videos else ""
    raise ApiError(
        400,
        f"the prompt holds {tokens.image} image tokens ({images} images){shown} and {tokens.text} text tokens, and "
        f"max_tokens is {max_tokens}: {tokens.total + max_tokens} tokens, more than the model's context length "
        f"of {context_length}; {fix}",
        "context_length_exceeded",
        param="messages",
    )


# --- memory -------------------------------------------------------------------------------------------------
# The constants below are fitted to the peak resident memory a request adds to `citrus-v deploy` (README, "Serve
# and app", gives the fit). Per image pixel: the picture, its RGB copy, the processor's and SAM 2's inputs made
# from it, masks brought back to its size.
PER_PIXEL_BYTES = 24
# the parsed request and its answer, whatever its images
PER_REQUEST_BYTES = 8 * 1024 * 1024
# one image's fixed share (its objects and the processor's per-image work), beyond its pixels and tokens
PER_IMAGE_BYTES = 256 * 1024
# the body's image text is held as received and as parsed strings while the request is read
BODY_COPIES = 2
# per prompt token: copies of the widest activations (the vision tower's merged patches and the language model's
# MLP)
ACTIVATION_COPIES = 9
_PIXEL_VALUE_BYTES = 4  # the processor's pixel_values are float32
_CHANNELS = 3
# Videos, fitted the same way: beyond the body and the file's bytes, a grey voxel holds 5 copies of its value (the
# file's array, its RAS+ reorientation, the stacked frames, the readers' intermediate copies) and 8 bytes more (the
# float64 stack the display window is taken from); a colour clip holds 2 copies of its RGB values. Each frame
# pixel also holds one boolean per [SEG] (two counted) in the mask stacks.
PER_VIDEO_BYTES = 2 * 1024 * 1024
GREY_VALUE_COPIES = 5
GREY_WINDOW_BYTES = 8
COLOUR_VALUE_COPIES = 2
PER_FRAME_PIXEL_BYTES = 2
# SAM 2 frames held at once in per-frame mode (the segmenter's chunk); memory mode holds every frame it segments,
# at most the predictor's max_frames. Both are the values of citrus_v.infer's defaults, repeated here because
# importing citrus_v.infer loads torch and the flag parser reads this module (a test keeps them equal)
SAM_FRAMES_PER_CHUNK = 8
SAM_MAX_FRAMES = 512


@dataclass(frozen=True)
class VideoFootprint:
    """What one video costs before it is decoded, from its header: its ``frames``, the pixels of all its frames
    (``frame_pixels``), the bytes its readers hold of its decoded values (``decoded_bytes``: copies × values ×
    bytes per value), the pixels of the frames the language model sees (``model_pixels``) and its file's bytes
    (``encoded_bytes``)."""

    frames: int
    frame_pixels: int
    decoded_bytes: int
    model_pixels: int = 0
    encoded_bytes: int = 0


@dataclass(frozen=True)
class MemoryModel:
    """What one request holds in memory while it is decoded and served, estimated before decoding::

        per_request + body_copies × image and video text of the body
                    + Σ_images (per_image + per_pixel × width × height + decoded_bytes)
                    + Σ_videos (per_video + file bytes
                                + (copies × bytes per value [+ 8 for grey]) × frames × height × width × samples
                                + per_frame_pixel × frames × height × width
                                + per_pixel × pixels of the frames the language model sees
                                + per_sam_frame × frames SAM 2 holds at once)
                    + per_token × choices × (prompt tokens + max_tokens)

    ``per_pixel`` covers the decoded picture and what the processor and the answer make from it at its size;
    ``decoded_bytes`` is the container's own decode (a DICOM frame, a NIfTI volume, from its header);
    ``per_token`` is what one token costs in the model (:meth:`for_model`). For a video, ``copies`` are the
    copies of its decoded values the readers hold (``GREY_VALUE_COPIES`` of modality values or NIfTI voxels and
    a float64 stack for the window, ``COLOUR_VALUE_COPIES`` of RGB; :class:`VideoFootprint`),
    ``per_frame_pixel`` the mask stacks; SAM 2 holds ``sam_frames_held`` frames' inputs and features at once
    (per-frame prompting, a chunk) or every frame it segments (``None``: memory propagation), at most
    ``max_sam_frames``.
    """

    per_request: int = PER_REQUEST_BYTES
    per_image: int = PER_IMAGE_BYTES
    per_pixel: float = PER_PIXEL_BYTES
    per_token: int = 0
    body_copies: int = BODY_COPIES
    per_video: int = PER_VIDEO_BYTES
    per_frame_pixel: float = PER_FRAME_PIXEL_BYTES
    per_sam_frame: int = 0
    sam_frames_held: int | None = SAM_FRAMES_PER_CHUNK
    max_sam_frames: int = SAM_MAX_FRAMES

    @classmethod
    def for_model(cls, config: Any, itemsize: int, processor: Any) -> MemoryModel:
        """The model for a checkpoint: ``per_token`` = one token's float32 ``pixel_values`` (its merged
        patches) + its key/value cache (2 × layers × key/value heads × head size) + ``ACTIVATION_COPIES`` ×
        (the vision tower's width × merged patches + the language model's MLP width), in ``itemsize`` bytes."""
        text = getattr(config, "text_config", None) or config
        vision = getattr(config, "vision_config", None)
        image_processor = processor.image_processor
        merge = int(image_processor.merge_size) ** 2
        patch = int(image_processor.patch_size) ** 2 * int(getattr(image_processor, "temporal_patch_size", 2) or 2)
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        hidden = int(getattr(text, "hidden_size", 0) or 0)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        widths = merge * int(getattr(vision, "hidden_size", 0) or 0) + int(getattr(text, "intermediate_size", 0) or 0)
        per_token = (
            merge * _CHANNELS * patch * _PIXEL_VALUE_BYTES
            + 2 * layers * kv_heads * head_dim * itemsize
            + ACTIVATION_COPIES * widths * itemsize
        )
        return cls(per_token=int(per_token))

    def estimate(
        self,
        images: Sequence[ImageHeader],
        tokens: PromptTokens,
        choices: int,
        max_tokens: int,
        body_bytes: int = 0,
        videos: Sequence[VideoFootprint] = (),
    ) -> int:
        """The bytes one request is expected to hold at its peak (see the class docstring)."""
        pictures = sum(self.per_image + self.per_pixel * h.pixels + h.decoded_bytes for h in images)
        stacks = sum(self.video_bytes(video) for video in videos)
        generation = self.per_token * choices * (tokens.total + max_tokens)
        return int(self.per_request + self.body_copies * body_bytes + pictures + stacks + generation)

    def video_bytes(self, video: VideoFootprint) -> int:
        """One video's share of the estimate (see the class docstring)."""
        segmented = min(video.frames, self.max_sam_frames)
        held = segmented if self.sam_frames_held is None else min(segmented, self.sam_frames_held)
        return int(
            self.per_video
            + video.encoded_bytes
            + video.decoded_bytes
            + self.per_frame_pixel * video.frame_pixels
            + self.per_pixel * video.model_pixels
            + self.per_sam_frame * held
        )
