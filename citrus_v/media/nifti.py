"""NIfTI (``.nii`` / ``.nii.gz``) through nibabel: slices in a fixed display orientation, and masks back.

The volume is brought to RAS+ first; a slice is shown with superior/anterior at the top and in radiological
left-right. :class:`NiftiVolume` keeps the affine so that masks drawn on slices go back into the original voxel
grid. A volume that arrives as bytes (a ``data:`` URL) is recognised by :func:`is_nifti` and read by
:func:`read_nifti_bytes`, whose errors name the source it was given. nibabel is imported on first use.

Every reader checks the header first, before a voxel is read or a byte inflated: the dimensions, the data type,
every voxel of every dimension against the pixel limit's volume allowance, and the decoded bytes (voxels x the
bytes of the type they are held in) against the byte budget. Gzipped bytes are inflated no further than the
header declares. Decoded volumes are cached only within :data:`VOLUME_CACHE_BYTES`.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bounded_inflate import GZIP_MAGIC, BoundedInflater
from .errors import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MedicalImageError,
    check_decoded_bytes,
    check_pixels,
    path_error,
    require_file,
)
from .windowing import Window, apply_window, full_range_window, parse_window

# NIfTI-1 keeps its magic at byte 344 of the 348-byte header, NIfTI-2 at byte 4 of its 540-byte header.
_NIFTI1_MAGIC, _NIFTI2_MAGIC = b"n+1\0", b"n+2\0"
_HEADER_BYTES = 544
# a volume holds many slices: allow this many images' worth of voxels before calling it a bomb
_VOLUME_IMAGES = 64
# the header and its extensions, before the voxels (the header's vox_offset), may take this many bytes
_HEADER_ALLOWANCE = 1 << 23
# NIfTI intent codes of CIFTI-2 files (.dconn.nii, .dscalar.nii, ...), which hold matrices, not volumes
_CIFTI_INTENTS = range(3000, 3100)
# the volumes kept after reading (rows name many slices of one volume in a row) take at most this many bytes
VOLUME_CACHE_BYTES = 1 << 28


def to_display(plane: np.ndarray, axis: int) -> np.ndarray:
    """A RAS+ voxel plane to display orientation: superior/anterior up, patient right on the image left."""
    display = np.flipud(plane.T)
    return display if axis == 0 else np.fliplr(display)


def from_display(display: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    plane = display if axis == 0 else np.fliplr(display)
    return np.flipud(plane).T


@dataclass
class NiftiVolume:
    """A NIfTI volume brought to RAS+ (``data``), with what is needed to write slice masks back.

    ``affine`` and ``shape`` are the original file's; ``ornt`` maps the original voxel axes to RAS+.
    """

    data: np.ndarray  # [X, Y, Z] in RAS+ voxel order
    affine: np.ndarray
    shape: tuple[int, ...]
    ornt: np.ndarray
    header: Any = field(repr=False, default=None)

    def num_slices(self, axis: int = 2) -> int:
        return int(self.data.shape[axis])

    def slice(self, index: int | None = None, axis: int = 2) -> np.ndarray:
        """One slice in display orientation (middle slice when ``index`` is None)."""
        count = self.num_slices(axis)
        index = count // 2 if index is None else int(index)
        if not 0 <= index < count:
            raise MedicalImageError(f"slice {index} is outside 0..{count - 1} along axis {axis}", "bad_reference")
        return to_display(np.take(self.data, index, axis=axis), axis)

    def picture(self, index: int | None = None, axis: int = 2, window: str | Window | None = None) -> Image.Image:
        """One slice as an 8-bit RGB image; without ``window``, one full-range window for the whole volume, so
        that every slice of a series looks alike."""
        plane = self.slice(index, axis)
        return Image.fromarray(apply_window(plane, parse_window(window) or full_range_window(self.data))).convert(
            "RGB"
        )

    def slices(self, axis: int = 2) -> list[np.ndarray]:
        """Every slice along ``axis``, in display orientation."""
        return [self.slice(k, axis) for k in range(self.num_slices(axis))]

    def volume_from_slices(self, slices: dict[int, np.ndarray] | list[np.ndarray], axis: int = 2) -> np.ndarray:
        """Stack display-orientation slice arrays (e.g. predicted masks) back into the original voxel grid."""
        from nibabel.orientations import apply_orientation

        items = dict(enumerate(slices)) if isinstance(slices, list) else dict(slices)
        dtype = next(iter(items.values())).dtype if items else np.uint8
        canonical = np.zeros(self.data.shape, dtype=dtype)
        for index, display in items.items():
            plane = from_display(np.asarray(display), axis)
            if plane.shape != tuple(np.delete(np.array(self.data.shape), axis)):
                raise MedicalImageError(
                    f"slice {index}: {display.shape} does not match the volume's slice size", "mask_size"
                )
            np.moveaxis(canonical, axis, 0)[index] = plane
        return apply_orientation(canonical, _inverse_ornt(self.ornt))

    def mask_image(self, slices: dict[int, np.ndarray] | list[np.ndarray], axis: int = 2) -> Any:
        """A ``nibabel.Nifti1Image`` label volume on the original grid and affine (save with ``nibabel.save``)."""
        import nibabel as nib

        volume = self.volume_from_slices(slices, axis).astype(np.uint8)
        return nib.Nifti1Image(volume, self.affine)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(axcodes2ornt(("R", "A", "S")), ornt)


def read_nifti(
    path: str | Path,
    t: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> NiftiVolume:
    """Load a 3-D NIfTI volume (for 4-D files the ``t``-th volume, default 0), reoriented to RAS+.

    The header is checked first, on every call (see the module docstring). Recent volumes are cached (keyed by
    path, modification time, size and ``t``) within :data:`VOLUME_CACHE_BYTES`: rows usually name many slices
    of one volume in a row.
    """
    path = Path(path)
    require_file(path)
    try:
        stat = path.stat()
        resolved = str(path.resolve())
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: a symbolic-link loop (Python < 3.13)
        raise path_error(path, err) from err
    check_header(str(path), _file_header(path), max_pixels, max_bytes)
    key = (resolved, stat.st_mtime_ns, stat.st_size, t)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    volume = _volume(_load(path), str(path), t)
    _CACHE.put(key, volume)
    return volume


def nifti_display_size(
    path: Path,
    axis: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[int, int]:
    """``(width, height)`` of a display slice along ``axis`` (default 2), from the header only, with the checks
    of :func:`read_nifti` and the slice's pixels against ``max_pixels``."""
    require_file(path)
    check_header(str(path), _file_header(path), max_pixels, max_bytes)
    image = _load(path)
    _check_dimensions(str(path), tuple(int(s) for s in image.shape))
    shape = list(image.shape[:3]) + [1] * (3 - len(image.shape[:3]))
    ornt = _orientation(image, str(path))
    canonical = [0, 0, 0]
    for src, (dst, _flip) in enumerate(ornt):
        canonical[int(dst)] = shape[src]
    axis = 2 if axis is None else axis
    rest = [canonical[k] for k in range(3) if k != axis]  # display is the transposed plane
    check_pixels(path, int(rest[0]) * int(rest[1]), max_pixels)
    return int(rest[0]), int(rest[1])


class _VolumeCache:
    """The volumes read last, kept while their voxels take at most ``budget`` bytes together (the oldest leaves
    first; a volume larger than the whole budget is not kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._volumes: OrderedDict[tuple, NiftiVolume] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(volume.data.nbytes for volume in self._volumes.values())

    def get(self, key: tuple) -> NiftiVolume | None:
        with self._lock:
            volume = self._volumes.get(key)
            if volume is not None:
                self._volumes.move_to_end(key)
            return volume

    def put(self, key: tuple, volume: NiftiVolume) -> None:
        with self._lock:
            self._volumes.pop(key, None)
            if volume.data.nbytes > self.budget:
                return
            self._volumes[key] = volume
            while sum(kept.data.nbytes for kept in self._volumes.values()) > self.budget:
                self._volumes.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._volumes.clear()


_CACHE = _VolumeCache(VOLUME_CACHE_BYTES)


def _load(path: Path) -> Any:
    """The nibabel image of ``path``: header and a lazy voxel proxy, nothing decoded."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        return nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as err:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({err})", "unreadable_image") from err


def _orientation(image: Any, source: str) -> np.ndarray:
    """The axis mapping of ``image``'s voxel-to-world affine to RAS+; an affine that is missing, holds NaN or
    infinite values, or is singular (an axis with no direction) is refused before any voxel is read."""
    from nibabel.orientations import io_orientation

    if getattr(image, "affine", None) is None:  # nibabel loads CIFTI-2 (.dconn.nii, ...) as a matrix, not a volume
        raise MedicalImageError(
            f"{source}: a {type(image).__name__} without a voxel-to-world affine, not a NIfTI volume",
            "unreadable_image",
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    fix = "Fix: write a valid sform or qform into the file (e.g. nibabel's set_sform) or re-export it"
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise MedicalImageError(
            f"{source}: the voxel-to-world affine holds NaN or infinite values, so no slice orientation can be "
            f"derived. {fix}",
            "bad_affine",
        )
    try:
        ornt = io_orientation(affine)
    except (np.linalg.LinAlgError, ValueError) as err:
        raise MedicalImageError(f"{source}: the voxel-to-world affine cannot be decomposed ({err}). {fix}",
                                "bad_affine") from err
    if not np.isfinite(ornt).all():
        raise MedicalImageError(
            f"{source}: the voxel-to-world affine is singular (a voxel axis has no direction in space). {fix}",
            "bad_affine",
        )
    return ornt


def _check_dimensions(source: str, shape: tuple[int, ...]) -> None:
    """A 3-D volume or a 4-D series (one volume of it is read); more dimensions, or none of some size, are
    refused from the header, before any voxel is read."""
    if any(s < 1 for s in shape):
        raise MedicalImageError(f"{source}: the volume has no voxels (shape {shape})", "unreadable_image")
    if any(s != 1 for s in shape[4:]):
        raise MedicalImageError(
            f"{source}: a {len(shape)}-D volume (shape {shape}) is not supported. Fix: give a 3-D volume or a 4-D "
            "series (one volume of it is read, chosen with #t=N)",
            "unsupported_image",
        )


def _volume(image: Any, source: str, t: int | None) -> NiftiVolume:
    """A loaded nibabel image (its header already checked) as a RAS+ :class:`NiftiVolume`; errors name
    ``source``."""
    from nibabel.orientations import apply_orientation

    ornt = _orientation(image, source)
    shape = tuple(int(s) for s in image.shape)
    _check_dimensions(source, shape)
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    data = _read_voxels(source, image, shape, t)
    return NiftiVolume(apply_orientation(data, ornt), np.asarray(image.affine), shape[:3], ornt, image.header)


def check_header(
    source: str, header: Any, max_pixels: int | None, max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
) -> int:
    """Check a NIfTI header before any voxel is read; returns the bytes the file declares (header, extensions
    and voxels as stored).

    The dimensions (3-D, or 4-D read one volume at a time), the type (a number per voxel), the voxels of one
    volume against ``max_pixels`` times the volume allowance, and the decoded bytes of the whole file against
    ``max_bytes``: every voxel of every dimension times the bytes of the type they are held in (scaled integers
    are read as float64).
    """
    try:
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        slope, inter = header.get_slope_inter()
        offset = int(header.get_data_offset())
        intent = int(header["intent_code"])
    except Exception as err:  # nibabel raises varied types for broken headers
        raise MedicalImageError(f"{source}: not a readable NIfTI header ({err})", "unreadable_image") from err
    if intent in _CIFTI_INTENTS:
        raise MedicalImageError(
            f"{source}: a CIFTI-2 file (intent code {intent}): a matrix over brain structures, not a NIfTI volume",
            "unreadable_image",
        )
    _check_dimensions(source, shape)
    if dtype.kind not in "biuf":
        raise MedicalImageError(
            f"{source}: voxels of type {dtype} ({header.get_value_label('datatype')}) are not supported: one number "
            "per voxel is. Fix: save a scalar volume (e.g. the magnitude, or one channel)",
            "unsupported_image",
        )
    voxels = math.prod(shape)
    check_pixels(source, math.prod(shape[:3]), None if max_pixels is None else max_pixels * _VOLUME_IMAGES)
    scaled = slope not in (None, 1) or inter not in (None, 0)
    held = max(dtype.itemsize, 8) if scaled and dtype.kind in "biu" else dtype.itemsize
    what = f"{' x '.join(map(str, shape))} voxels held as {held}-byte values"
    check_decoded_bytes(source, voxels * held, max_bytes, what)
    if offset > _HEADER_ALLOWANCE:
        raise MedicalImageError(
            f"{source}: the header puts the voxels {offset} bytes into the file, past the {_HEADER_ALLOWANCE} bytes "
            "allowed for the header and its extensions. Fix: re-save the file without large extensions",
            "image_too_large",
        )
    first_voxel = max(offset, 352 if int(header["sizeof_hdr"]) == 348 else 544)  # header and extension flag
    return first_voxel + voxels * dtype.itemsize


def nifti_header(head: bytes, source: str) -> Any:
    """The NIfTI-1 or NIfTI-2 header (nibabel's) held in ``head``, the first bytes of an uncompressed file."""
    import nibabel as nib

    if head[344:348] == _NIFTI1_MAGIC:
        kind = nib.Nifti1Header
    elif head[4:8] == _NIFTI2_MAGIC:
        kind = nib.Nifti2Header
    else:
        raise MedicalImageError(
            f"{source}: not a NIfTI file (no NIfTI-1/2 header); send a .nii or .nii.gz file", "unreadable_image"
        )
    try:
        return kind(head[: kind.template_dtype.itemsize], check=False)
    except Exception as err:  # nibabel raises varied types for broken headers
        raise MedicalImageError(f"{source}: not a readable NIfTI header ({err})", "unreadable_image") from err


def _file_header(path: Path) -> Any:
    """The header of a ``.nii`` or ``.nii.gz`` file, reading (inflating) only its first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
            if head[:2] == GZIP_MAGIC:
                handle.seek(0)
                head = BoundedInflater(handle, gzip=True).read(_HEADER_BYTES)
    except (OSError, ValueError) as err:
        raise path_error(path, err) from err
    except zlib.error as err:
        raise MedicalImageError(f"{path}: not a readable NIfTI file (broken gzip data: {err})") from err
    return nifti_header(head, str(path))


def _header_bytes(data: bytes) -> bytes:
    """The first bytes of a NIfTI file given whole, gzip-compressed or not (only the header is inflated)."""
    if data[:2] != GZIP_MAGIC:
        return data[:_HEADER_BYTES]
    try:
        return BoundedInflater(data, gzip=True).read(_HEADER_BYTES)
    except zlib.error:
        return b""


def is_nifti(data: bytes) -> bool:
    """Whether ``data`` holds a single-file NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``), by its magic."""
    head = _header_bytes(data)
    return head[344:348] == _NIFTI1_MAGIC or head[4:8] == _NIFTI2_MAGIC


def read_nifti_bytes(
    data: bytes,
    source: str,
    t: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> NiftiVolume:
    """A NIfTI volume from the bytes of a ``.nii`` or ``.nii.gz`` file; every error names ``source``.

    The header is checked before the data is inflated (a gzip bomb is refused unread), and gzip data is inflated
    no further than the header declares: data that goes on past that is refused.
    """
    import nibabel as nib

    header = nifti_header(_header_bytes(data), source)
    declared = check_header(source, header, max_pixels, max_bytes)
    raw = _inflate_declared(data, declared, source) if data[:2] == GZIP_MAGIC else data
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        image = kind.from_bytes(raw)
    except Exception as err:  # nibabel and numpy raise varied types for broken data
        raise MedicalImageError(f"{source}: not a readable NIfTI file ({err})", "unreadable_image") from err
    return _volume(image, source, t)


def _inflate_declared(data: bytes, declared: int, source: str) -> bytes:
    """Gzip ``data`` inflated to the ``declared`` bytes of its header, refused when it holds more."""
    inflater = BoundedInflater(data, gzip=True)
    try:
        raw = inflater.read(declared)
        longer = inflater.more_follows()
    except zlib.error as err:
        raise MedicalImageError(f"{source}: not a readable NIfTI file (broken gzip data: {err})") from err
    if len(raw) < declared and not inflater.finished:
        raise MedicalImageError(
            f"{source}: not a readable NIfTI file (the gzip data ends after {len(raw)} of the {declared} bytes its "
            "header declares: the file is cut short). Fix: send the whole file",
            "unreadable_image",
        )
    if longer:
        raise MedicalImageError(
            f"{source}: the gzip data inflates past the {declared} bytes its NIfTI header declares (header, "
            "extensions and voxels); refused before reading further (a decompression bomb). Fix: re-save the file",
            "image_too_large",
        )
    return raw


def _read_voxels(path: Path | str, image: Any, shape: tuple[int, ...], t: int | None) -> np.ndarray:
    """The ``[X, Y, Z]`` voxels of volume ``t`` (default 0) in file order, reading only that volume of a 4-D file."""
    try:
        proxy = image.dataobj
        if len(image.shape) > 3:
            count = int(image.shape[3])  # any further dimension is 1 (checked by _check_dimensions)
            index = 0 if t is None else int(t)
            if not 0 <= index < count:
                raise MedicalImageError(f"{path}: volume t={index} is outside 0..{count - 1}", "bad_reference")
            # reads only that volume
            return np.asarray(proxy[(slice(None),) * 3 + (index,) + (0,) * (len(image.shape) - 4)])
        return np.asarray(proxy).reshape(shape[:3])
    except MedicalImageError:
        raise
    except Exception as err:  # gzip and array readers raise varied types on truncated files
        raise MedicalImageError(f"{path}: truncated or unreadable voxel data ({err})", "truncated_image") from err
