"""Any volume or clip reference to a :class:`~citrus_v.media.volume.Volume`: dispatch by what the source is.

A reference is a path with the options of :mod:`~citrus_v.media.refs` that apply to a whole stack (``axis``,
``t``, ``window``) plus ``series`` (which series of a folder or zip), e.g. ``ct.nii.gz#axis=1&window=ct-lung``,
``study/#series=1.2.840...``, or a dict with the same keys and ``path``:

* a NIfTI file (``.nii``, ``.nii.gz``): display slices along ``axis`` (RAS+, default 2: axial), volume ``t``
  of a 4-D file;
* a folder or a ``.zip`` of DICOM slices: one series (:mod:`~citrus_v.media.dicom_series`);
* a DICOM file: its frames, a volume or a cine clip (:mod:`~citrus_v.media.dicom_multiframe`);
* a video file (mp4, mov, avi, webm, mkv, ...): a clip (:mod:`~citrus_v.media.video`).

Bytes as a server receives them (a NIfTI file, a zip of DICOM slices, a DICOM file, a video) go through
:func:`read_volume_bytes`. Every reader checks ``max_voxels`` (frames x pixels x samples) and ``max_frames``
from the headers before it decodes a pixel; ``frames`` decodes only those frames (as chosen by
:mod:`~citrus_v.media.frame_sampling`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np

from .dicom_multiframe import dicom_bytes, dicom_file, probe_dicom_multiframe, read_dicom_multiframe
from .dicom_series import collect_series, file_bytes_limit, is_zip, probe_dicom_series, read_dicom_series
from .errors import MedicalImageError, path_error, require_file
from .nifti import NiftiVolume, is_nifti, read_nifti, read_nifti_bytes
from .refs import MediaRef, parse_ref
from .video import is_video_name, probe_video, read_video
from .volume import DEFAULT_MAX_VOLUME_VOXELS, Volume, VolumeHeader
from .windowing import Window, parse_window

_DICM_OFFSET = 128


@dataclass
class VolumeRef:
    """A parsed volume reference: the path and the options that apply to a whole stack."""

    path: Path
    axis: int | None = None
    t: int | None = None
    window: Window | None = None
    series: str | None = None

    @property
    def format(self) -> str:
        """``nifti``, ``dicom_series`` (a folder or zip), ``dicom`` or ``video``."""
        return source_format(self.path)


def parse_volume_ref(ref: str | Path | Mapping[str, Any] | MediaRef, base_dir: str | Path | None = None) -> VolumeRef:
    """Parse a volume reference (see the module docstring); one slice or frame (``slice=``/``frame=``) is an
    image reference, refused here."""
    if isinstance(ref, MediaRef):
        parsed, series = ref, None
    else:
        rest, series = _split_series(ref)
        parsed = parse_ref(rest, base_dir)
    if parsed.slice is not None or parsed.frame is not None:
        raise MedicalImageError(
            f"reference {ref!r} names one slice or frame: a volume reference takes axis, t, window and series. "
            "Fix: drop slice=/frame= to read the whole stack, or read it as an image",
            "bad_reference",
        )
    return VolumeRef(parsed.path, parsed.axis, parsed.t, parse_window(parsed.window), series)


def _split_series(ref: str | Path | Mapping[str, Any]) -> tuple[str | Mapping[str, Any], str | None]:
    """The reference without its ``series`` option, and that option."""
    if isinstance(ref, Mapping):
        rest = {k: v for k, v in ref.items() if k != "series"}
        return rest, None if ref.get("series") is None else str(ref["series"])
    text = str(ref)
    head, hash_, fragment = text.rpartition("#")
    if not hash_:
        return text, None
    pairs = parse_qsl(fragment, keep_blank_values=True)
    series = [v for k, v in pairs if k == "series"]
    if not series:
        return text, None
    others = [(k, v) for k, v in pairs if k != "series"]
    return head + ("#" + urlencode(others) if others else ""), series[-1]


def source_format(path: Path) -> str:
    """What a path holds, by its kind and name (a DICOM file without a suffix by its preamble)."""
    name = path.name.lower()
    try:
        if path.is_dir():
            return "dicom_series"
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a symbolic-link loop
        raise path_error(path, err) from err
    require_file(path)
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".zip"):
        return "dicom_series"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    if is_video_name(name):
        return "video"
    with open(path, "rb") as handle:
        head = handle.read(_DICM_OFFSET + 4)
    if head[_DICM_OFFSET:] == b"DICM":
        return "dicom"
    if is_zip(head):
        return "dicom_series"
    raise MedicalImageError(
        f"{path}: not a volume or clip this reader knows. Fix: give a NIfTI file (.nii/.nii.gz), a folder or .zip "
        "of DICOM slices, a DICOM file, or a video (.mp4, .mov, .avi, .webm, .mkv)",
        "unsupported_image",
    )


def probe_volume(ref: str | Path | Mapping[str, Any] | MediaRef, base_dir: str | Path | None = None) -> VolumeHeader:
    """Frames, frame size, samples and frame rate of a volume or clip, from its headers (no pixel decoded)."""
    parsed = parse_volume_ref(ref, base_dir)
    kind = parsed.format
    if kind == "nifti":
        return _nifti_header(_nifti_image(parsed.path), str(parsed.path), parsed.axis)
    if kind == "dicom_series":
        with collect_series(parsed.path, series=parsed.series) as files:
            if files.single_multiframe:
                return probe_dicom_multiframe(files.slices[0])
            return probe_dicom_series(files)
    if kind == "dicom":
        return probe_dicom_multiframe(dicom_file(parsed.path))
    return probe_video(parsed.path)


def read_volume(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    *,
    frames: list[int] | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS,
    max_frames: int | None = None,
) -> Volume:
    """Read a volume or clip reference (see the module docstring) as a :class:`Volume`.

    ``frames``: only these frames (indices into the stack, in its order) are decoded; ``max_voxels`` and
    ``max_frames`` (``None``: no limit) bound what is decoded and are checked from the headers first.
    """
    parsed = parse_volume_ref(ref, base_dir)
    limits = {"frames": frames, "max_voxels": max_voxels, "max_frames": max_frames}
    kind = parsed.format
    if kind == "nifti":
        path = parsed.path
        return _read_nifti_volume(lambda: read_nifti(path, parsed.t, None), _nifti_image(path), str(path),
                                  parsed, **limits)
    if kind == "dicom_series":
        with collect_series(parsed.path, series=parsed.series, max_file_bytes=file_bytes_limit(max_voxels)) as files:
            if files.single_multiframe:
                return read_dicom_multiframe(files.slices[0], window=parsed.window, **limits)
            return read_dicom_series(files, window=parsed.window, **limits)
    if kind == "dicom":
        return read_dicom_multiframe(dicom_file(parsed.path), window=parsed.window, **limits)
    return _with_window(read_video(parsed.path, **limits), parsed.window)


def read_volume_bytes(
    data: bytes,
    name: str,
    *,
    axis: int | None = None,
    t: int | None = None,
    window: str | Window | None = None,
    series: str | None = None,
    frames: list[int] | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS,
    max_frames: int | None = None,
) -> Volume:
    """A volume or clip sent as bytes (a ``data:`` URL): a NIfTI file, a zip of DICOM slices, a DICOM file or a
    video, told apart by their contents; ``name`` names the source in every message."""
    options = VolumeRef(Path(name), axis, t, parse_window(window), series)
    limits = {"frames": frames, "max_voxels": max_voxels, "max_frames": max_frames}
    if is_nifti(data):
        image = _nifti_bytes_image(data, name)
        return _read_nifti_volume(lambda: read_nifti_bytes(data, name, t, None), image, name, options, **limits)
    if is_zip(data):
        with collect_series(data, name, series, file_bytes_limit(max_voxels)) as files:
            if files.single_multiframe:
                return read_dicom_multiframe(files.slices[0], window=options.window, **limits)
            return read_dicom_series(files, window=options.window, **limits)
    if data[_DICM_OFFSET:_DICM_OFFSET + 4] == b"DICM":
        return read_dicom_multiframe(dicom_bytes(data, name), window=options.window, **limits)
    return _with_window(read_video(data, name, **limits), options.window)


def probe_volume_bytes(data: bytes, name: str, *, axis: int | None = None, series: str | None = None) -> VolumeHeader:
    """What :func:`read_volume_bytes` would decode, from the headers only."""
    if is_nifti(data):
        return _nifti_header(_nifti_bytes_image(data, name), name, axis)
    if is_zip(data):
        with collect_series(data, name, series) as files:
            if files.single_multiframe:
                return probe_dicom_multiframe(files.slices[0])
            return probe_dicom_series(files)
    if data[_DICM_OFFSET:_DICM_OFFSET + 4] == b"DICM":
        return probe_dicom_multiframe(dicom_bytes(data, name))
    return probe_video(data, name)


def _with_window(volume: Volume, window: Window | None) -> Volume:
    if window is not None and volume.values.ndim == 3:
        volume.window = window
    return volume


# ---- NIfTI: display slices along an axis ----


def _nifti_image(path: Path) -> Any:
    """The nibabel image (header and a lazy voxel proxy: nothing decoded)."""
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for broken headers
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({err})", "unreadable_image") from err


def _nifti_bytes_image(data: bytes, name: str) -> Any:
    """A header-only stand-in for NIfTI bytes: its shape and affine, read without inflating the voxels."""
    from .nifti import _header_bytes, nifti_header

    header = nifti_header(_header_bytes(data), name)
    try:
        return _HeaderOnly(tuple(int(s) for s in header.get_data_shape()), header.get_best_affine(), header)
    except Exception as err:  # nibabel raises varied types for broken headers
        raise MedicalImageError(f"{name}: not a readable NIfTI header ({err})", "unreadable_image") from err


@dataclass
class _HeaderOnly:
    shape: tuple[int, ...]
    affine: np.ndarray
    header: Any


def _nifti_header(image: Any, source: str, axis: int | None) -> VolumeHeader:
    """Frames along ``axis`` and the display frame size of a NIfTI image, from its header."""
    from .nifti import _check_dimensions, _orientation

    shape = tuple(int(s) for s in image.shape)
    _check_dimensions(source, shape)
    spatial = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    canonical = [0, 0, 0]
    for src, (dst, _flip) in enumerate(_orientation(image, source)):
        canonical[int(dst)] = spatial[src]
    axis = 2 if axis is None else axis
    first, second = (k for k in range(3) if k != axis)
    return VolumeHeader(source, "volume", canonical[axis], canonical[second], canonical[first])


def _read_nifti_volume(
    load: Any,
    image: Any,
    source: str,
    options: VolumeRef,
    frames: list[int] | None,
    max_voxels: int | None,
    max_frames: int | None,
) -> Volume:
    """Check the limits from the header, then load (``load()``: the cached RAS+ reader) and stack the
    display slices along the axis."""
    axis = 2 if options.axis is None else options.axis
    chosen = _nifti_header(image, source, axis).check(max_voxels, max_frames, frames)
    nifti: NiftiVolume = load()
    values = np.stack([nifti.slice(k, axis) for k in chosen])
    return Volume(
        values=values,
        kind="volume",
        source=source,
        spacing=display_spacing(nifti, axis),
        affine=display_affine(nifti, axis),
        window=options.window,
        nifti=nifti,
        axis=axis,
        source_frames=None if frames is None else chosen,
    )


def display_spacing(nifti: NiftiVolume, axis: int) -> tuple[float, float, float]:
    """``(between slices, row, column)`` in mm: the header's zooms in RAS+ order, for display slices along
    ``axis`` (rows run along the higher remaining axis, columns along the lower)."""
    zooms = [float(z) for z in nifti.header.get_zooms()[:3]] if nifti.header is not None else [1.0, 1.0, 1.0]
    zooms += [1.0] * (3 - len(zooms))
    canonical = [0.0, 0.0, 0.0]
    for src, (dst, _flip) in enumerate(nifti.ornt):
        canonical[int(dst)] = zooms[src]
    first, second = (k for k in range(3) if k != axis)
    return canonical[axis], canonical[second], canonical[first]


def display_affine(nifti: NiftiVolume, axis: int) -> np.ndarray:
    """The ``(column, row, frame)`` -> RAS mm affine of the display slices along ``axis``.

    Display slice ``k`` is ``to_display`` of the RAS+ plane ``k``: row ``r`` is the plane's last index
    ``H-1-r`` along the higher remaining axis; column ``c`` is index ``c`` along the lower one for sagittal
    slices (axis 0) and ``W-1-c`` otherwise (radiological left-right).
    """
    from nibabel.orientations import inv_ornt_aff

    canonical = np.asarray(nifti.affine, dtype=np.float64) @ inv_ornt_aff(nifti.ornt, nifti.shape[:3])
    size = nifti.data.shape
    first, second = (k for k in range(3) if k != axis)
    to_voxel = np.zeros((4, 4))
    to_voxel[3, 3] = 1.0
    to_voxel[axis, 2] = 1.0
    to_voxel[second, 1], to_voxel[second, 3] = -1.0, size[second] - 1
    if axis == 0:
        to_voxel[first, 0] = 1.0
    else:
        to_voxel[first, 0], to_voxel[first, 3] = -1.0, size[first] - 1
    return canonical @ to_voxel
