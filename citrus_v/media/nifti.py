"""NIfTI (``.nii`` / ``.nii.gz``) through nibabel: slices in a fixed display orientation, and masks back.

The volume is brought to RAS+ first; a slice is shown with superior/anterior at the top and in radiological
left-right. :class:`NiftiVolume` keeps the affine so that masks drawn on slices go back into the original voxel
grid. A volume that arrives as bytes (a ``data:`` URL) is recognised by :func:`is_nifti` and read by
:func:`read_nifti_bytes`, whose errors name the source it was given. nibabel is imported on first use.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DEFAULT_MAX_IMAGE_PIXELS, MedicalImageError, check_pixels
from .windowing import Window, apply_window, full_range_window, parse_window

# NIfTI-1 keeps its magic at byte 344 of the 348-byte header, NIfTI-2 at byte 4 of its 540-byte header.
_NIFTI1_MAGIC, _NIFTI2_MAGIC = b"n+1\0", b"n+2\0"
_HEADER_BYTES = 544
_GZIP_MAGIC = b"\x1f\x8b"
# a volume holds many slices: allow this many images' worth of voxels before calling it a bomb
_VOLUME_IMAGES = 64


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
    path: str | Path, t: int | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> NiftiVolume:
    """Load a 3-D NIfTI volume (for 4-D files the ``t``-th volume, default 0), reoriented to RAS+.

    The last two volumes read are cached (keyed by path, modification time and ``t``): rows usually name
    many slices of one volume in a row.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise MedicalImageError(f"image file not found: {path}", "missing_file")
        stat = path.stat()
        resolved = str(path.resolve())
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a symbolic-link loop
        if isinstance(err, MedicalImageError):
            raise
        raise MedicalImageError(
            f"{path}: the file cannot be opened ({getattr(err, 'strerror', None) or err}). Fix: check the path "
            "(each name at most 255 bytes, no NUL byte, no symbolic-link loop)",
            "unreadable_image",
        ) from err
    return _read_nifti_cached(resolved, stat.st_mtime_ns, stat.st_size, t, max_pixels)


def nifti_display_size(path: Path, axis: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of a display slice along ``axis`` (default 2), from the header only."""
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises several types for broken headers
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({err})", "unreadable_image") from err
    _check_dimensions(str(path), tuple(int(s) for s in image.shape))
    shape = list(image.shape[:3]) + [1] * (3 - len(image.shape[:3]))
    ornt = _orientation(image, str(path))
    canonical = [0, 0, 0]
    for src, (dst, _flip) in enumerate(ornt):
        canonical[int(dst)] = shape[src]
    axis = 2 if axis is None else axis
    rest = [canonical[k] for k in range(3) if k != axis]  # display is the transposed plane
    return int(rest[0]), int(rest[1])


@functools.lru_cache(maxsize=2)
def _read_nifti_cached(path: str, _mtime: int, _size: int, t: int | None, max_pixels: int | None) -> NiftiVolume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    try:
        image = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as err:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({err})", "unreadable_image") from err
    return _volume(image, str(path), t, max_pixels)


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


def _volume(image: Any, source: str, t: int | None, max_pixels: int | None) -> NiftiVolume:
    """A loaded nibabel image as a RAS+ :class:`NiftiVolume`; errors name ``source``."""
    from nibabel.orientations import apply_orientation

    ornt = _orientation(image, source)
    shape = tuple(int(s) for s in image.shape)
    _check_dimensions(source, shape)
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    check_pixels(source, int(np.prod(shape[:3])), None if max_pixels is None else max_pixels * _VOLUME_IMAGES)
    data = _read_voxels(source, image, shape, t)
    return NiftiVolume(apply_orientation(data, ornt), np.asarray(image.affine), shape[:3], ornt, image.header)


def _header_bytes(data: bytes) -> bytes:
    """The first bytes of a NIfTI file given whole, gzip-compressed or not (only the header is inflated)."""
    if data[:2] != _GZIP_MAGIC:
        return data[:_HEADER_BYTES]
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, _HEADER_BYTES)
    except zlib.error:
        return b""


def is_nifti(data: bytes) -> bool:
    """Whether ``data`` holds a single-file NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``), by its magic."""
    head = _header_bytes(data)
    return head[344:348] == _NIFTI1_MAGIC or head[4:8] == _NIFTI2_MAGIC


def read_nifti_bytes(
    data: bytes, source: str, t: int | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> NiftiVolume:
    """A NIfTI volume from the bytes of a ``.nii`` or ``.nii.gz`` file; every error names ``source``.

    The voxel count is checked from the header before the data is inflated (a gzip bomb is refused unread).
    """
    import nibabel as nib

    if not is_nifti(data):
        raise MedicalImageError(
            f"{source}: not a NIfTI file (no NIfTI-1/2 header); send a .nii or .nii.gz file", "unreadable_image"
        )
    head = _header_bytes(data)
    kind = nib.Nifti2Image if head[4:8] == _NIFTI2_MAGIC else nib.Nifti1Image
    size = kind.header_class.template_dtype.itemsize
    try:
        header = kind.header_class(head[:size], check=False)
        _check_dimensions(source, tuple(int(s) for s in header.get_data_shape()))
        shape = tuple(int(s) for s in header.get_data_shape()[:3])
        check_pixels(source, int(np.prod(shape)), None if max_pixels is None else max_pixels * _VOLUME_IMAGES)
        raw = gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
        image = kind.from_bytes(raw)
    except MedicalImageError:
        raise
    except Exception as err:  # nibabel, gzip and numpy raise varied types for broken data
        raise MedicalImageError(f"{source}: not a readable NIfTI file ({err})", "unreadable_image") from err
    return _volume(image, source, t, max_pixels)


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
