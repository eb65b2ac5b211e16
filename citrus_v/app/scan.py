"""An uploaded file as the page sees it: its kind, modality, frames (or slices per axis and time points), the
pixel spacing of what is shown, and the 2-D picture of one chosen view at the file's own resolution.

Pixels come from :mod:`citrus_v.media`; the DICOM header (modality, pixel spacing) is read with pydicom, without
the pixel data. A zip of DICOM slices and a video are shown from the :class:`~citrus_v.media.volume.Volume` that
:func:`citrus_v.media.read_volume` reads; a multi-frame DICOM asked about as a whole is shown frame by frame as
in picture mode, in the Volume's frame order (enhanced frames by position along the normal). So frame ``k`` of a
whole-volume answer, which the server numbers in that order, is the frame shown at slider position ``k + 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .measurements import PixelSpacing, usable_spacing
from .window_menu import FILE_WINDOW, is_ct

if TYPE_CHECKING:
    from ..media import Volume

# NIfTI volumes are brought to RAS+ by citrus_v.media: axis 0 runs left-right, 1 back-front, 2 feet-head.
AXES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
NIFTI_LENGTH_UNITS_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}
# a NIfTI volume sent whole is read by the server along this RAS+ axis (read_volume_bytes' default: axial)
SERVER_AXIS = 2
STACK_KINDS = frozenset({"series", "video"})  # uploads shown from their Volume
VOLUMES_KEPT = 2  # decoded stacks kept in memory: the upload shown and the one before it


@dataclass(frozen=True)
class View:
    """Which 2-D picture of a scan: frame (DICOM) or slice (NIfTI) ``index``, NIfTI ``axis`` and time point
    ``t``, the window (a preset name, ``"C,W"`` or ``file``), and whether the question is about the whole
    volume (``whole``: a multi-frame DICOM is then shown in the volume's frame order)."""

    index: int = 0
    axis: int = 2
    t: int = 0
    window: str = FILE_WINDOW
    whole: bool = False


@dataclass(frozen=True)
class Scan:
    """What the page knows about an upload before showing it."""

    path: Path
    kind: str  # "raster", "dicom", "nifti", "series" (a zip of DICOM slices) or "video"
    modality: str | None  # DICOM Modality; None for NIfTI and pictures
    ct: bool  # whether the CT window presets apply
    frames: tuple[int, int, int]  # frames (DICOM: all three equal) or slices along NIfTI axes 0, 1, 2
    time_points: int  # 4-D NIfTI volumes; 1 otherwise
    spacing_mm: tuple[float, float, float] | None  # NIfTI voxel size along the RAS+ axes
    spacing_source: str
    dicom_spacing: PixelSpacing | None

    def frame_count(self, axis: int = 2) -> int:
        return self.frames[axis]

    @property
    def volume_capable(self) -> bool:
        """Whether the file can be asked about as a whole: a volume or clip of more than one frame."""
        return self.kind in STACK_KINDS or (self.kind in ("nifti", "dicom") and self.frames[SERVER_AXIS] > 1)

    def file_frame(self, view: View) -> int:
        """The DICOM file's frame (0-based) ``view`` shows: in whole-volume mode, slider frame ``k`` is the
        Volume's frame ``k`` (the file frame its reference names); else the file's frame ``k``."""
        if not view.whole or self.kind != "dicom" or self.frames[SERVER_AXIS] < 2:
            return view.index
        reference = self.volume().references[view.index]
        return view.index if reference.frame_number is None else reference.frame_number - 1

    def volume(self, t: int = 0) -> Volume:
        """The stack the server reads when the file is sent whole (time point ``t`` of a 4-D NIfTI file)."""
        return load_volume(self.path, t if self.time_points > 1 else None)

    def default_view(self, axis: int = 2) -> View:
        """The middle frame or slice along ``axis``."""
        return View(index=self.frame_count(axis) // 2, axis=axis)

    def pixel_spacing(self, axis: int = 2) -> PixelSpacing | None:
        """Spacing of the displayed picture's rows and columns, or ``None`` when the file has no usable one."""
        if self.kind in ("dicom", "series"):
            return self.dicom_spacing
        if self.kind != "nifti" or self.spacing_mm is None:
            return None
        # a display slice is the transposed RAS+ plane: its rows run along the later remaining axis
        first, second = (k for k in range(3) if k != axis)
        return usable_spacing(self.spacing_mm[second], self.spacing_mm[first], self.spacing_source)

    def describe(self, view: View) -> str:
        """What the picture is, in words: ``scan.dcm, frame 4 of 10``."""
        name = self.path.name
        if self.kind == "series":
            return f"{name}, slice {view.index + 1} of {self.frames[2]}"
        if self.kind in ("dicom", "video") and self.frames[2] > 1:
            return f"{name}, frame {view.index + 1} of {self.frames[2]}"
        if self.kind == "nifti":
            axis_name = next(n for n, a in AXES.items() if a == view.axis)
            text = f"{name}, {axis_name} slice {view.index + 1} of {self.frame_count(view.axis)}"
            return text + (f", time point {view.t + 1} of {self.time_points}" if self.time_points > 1 else "")
        return name

    def render(self, view: View) -> Image.Image:
        """The RGB picture of ``view`` at the file's resolution: what the server is sent."""
        from ..media import MediaRef, apply_window, full_range_window, parse_window, read_dicom, read_image, read_nifti

        window = view.window if self.ct and view.window != FILE_WINDOW else None
        if self.kind in STACK_KINDS:
            return self.volume(view.t).frame_image(view.index, window)
        if self.kind == "dicom":
            return Image.fromarray(read_dicom(self.path, self.file_frame(view)).to_uint8(window)).convert("RGB")
        if self.kind == "nifti":
            volume = read_nifti(self.path, view.t)
            plane = volume.slice(view.index, view.axis)
            # one window for the whole volume, so that every slice of a series looks alike
            pixels = apply_window(plane, parse_window(window) or full_range_window(volume.data))
            return Image.fromarray(pixels).convert("RGB")
        return read_image(MediaRef(self.path))


def open_scan(path: str | Path) -> Scan:
    """Read what the page needs to know of an upload (raises ``MedicalImageError`` for unreadable files)."""
    path = Path(path)
    return _open_scan_cached(str(path.resolve()), os.path.getmtime(path))


@lru_cache(maxsize=8)
def _open_scan_cached(path_text: str, _mtime: float) -> Scan:
    from ..media import MedicalImageError, parse_ref
    from ..media.dicom_series import is_zip
    from ..media.video import is_video_name

    path = Path(path_text)
    kind = parse_ref(path_text).kind
    if kind == "raster" and is_video_name(path.name):
        return _open_stack(path, "video")
    if kind == "raster":
        try:
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as err:
            raise MedicalImageError(f"{path}: cannot be read ({err})", "unreadable_image") from err
        if is_zip(head):
            return _open_stack(path, "series")
    if kind == "dicom":
        return _open_dicom(path)
    if kind == "nifti":
        return _open_nifti(path)
    return Scan(path, "raster", None, False, (1, 1, 1), 1, None, "", None)


def load_volume(path: str | Path, t: int | None = None) -> Volume:
    """The upload as :func:`citrus_v.media.read_volume` reads it (time point ``t`` of a 4-D NIfTI file), kept for
    the next view of the same file."""
    path = Path(path)
    return _load_volume_cached(str(path.resolve()), os.path.getmtime(path), t)


@lru_cache(maxsize=VOLUMES_KEPT)
def _load_volume_cached(path_text: str, _mtime: float, t: int | None) -> Volume:
    from ..media import read_volume

    return read_volume({"path": path_text, "t": t} if t is not None else path_text)


def _open_stack(path: Path, kind: str) -> Scan:
    """A zip of DICOM slices or a video: frames, modality and pixel spacing from the decoded stack."""
    volume = load_volume(path)
    modality = None
    if volume.datasets:
        modality = str(volume.datasets[0].get("Modality", "") or "").strip() or None
    spacing = None
    if volume.spacing is not None:
        source = "DICOM PixelSpacing" if kind == "series" else f"{path.name}'s spacing"
        spacing = usable_spacing(volume.spacing[1], volume.spacing[2], source)
    frames = (volume.num_frames,) * 3
    return Scan(path, kind, modality, is_ct("dicom", modality), frames, 1, None, "", spacing)


def _open_dicom(path: Path) -> Scan:
    import pydicom

    from ..media import MedicalImageError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as err:  # pydicom raises several types for broken headers
        raise MedicalImageError(f"{path}: not a readable DICOM file ({err})", "unreadable_image") from err
    modality = str(ds.get("Modality", "") or "").strip() or None
    return Scan(
        path, "dicom", modality, is_ct("dicom", modality), (frames,) * 3, 1, None, "", _dicom_spacing(ds)
    )


def _dicom_spacing(ds: Any) -> PixelSpacing | None:
    """Pixel Spacing (enhanced files: the shared Pixel Measures), else the detector's Imager Pixel Spacing."""
    candidates: list[tuple[Any, str]] = []
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = ds.get(groups)
        if sequence and "PixelMeasuresSequence" in sequence[0] and len(sequence[0].PixelMeasuresSequence):
            candidates.append((sequence[0].PixelMeasuresSequence[0].get("PixelSpacing"), "DICOM Pixel Measures"))
    candidates.append((ds.get("PixelSpacing"), "DICOM PixelSpacing"))
    candidates.append((ds.get("ImagerPixelSpacing"), "DICOM ImagerPixelSpacing (at the detector)"))
    for value, source in candidates:
        try:
            spacing = usable_spacing(float(value[0]), float(value[1]), source) if value is not None else None
        except (TypeError, ValueError, IndexError):  # a malformed value counts as no spacing
            spacing = None
        if spacing is not None:
            return spacing
    return None


def _open_nifti(path: Path) -> Scan:
    from ..media import read_nifti

    volume = read_nifti(path)
    shape = tuple(int(s) for s in volume.header.get_data_shape()) if volume.header is not None else volume.shape
    time_points = 1
    for extent in shape[3:]:
        time_points *= max(int(extent), 1)
    x, y, z = (int(s) for s in volume.data.shape[:3])
    spacing, source = _nifti_spacing(volume)
    ct = is_ct("nifti", None, volume.data)
    return Scan(path, "nifti", None, ct, (x, y, z), time_points, spacing, source, None)


def _nifti_spacing(volume: Any) -> tuple[tuple[float, float, float] | None, str]:
    """Voxel size in mm along the RAS+ axes (the header's zooms, reordered as the volume was), and its source."""
    header = volume.header
    if header is None:
        return None, ""
    zooms = [float(z) for z in header.get_zooms()[:3]]
    unit = header.get_xyzt_units()[0]
    scale = NIFTI_LENGTH_UNITS_MM.get(unit, 1.0)
    source = "NIfTI pixdim" if unit in NIFTI_LENGTH_UNITS_MM else "NIfTI pixdim (no unit in the header: mm assumed)"
    canonical = [0.0, 0.0, 0.0]
    for src, (dst, _flip) in enumerate(volume.ornt):
        canonical[int(dst)] = zooms[src] * scale if src < len(zooms) else 0.0
    return (canonical[0], canonical[1], canonical[2]), source
