"""Medical image I/O: the one place where images and masks are read, for training, inference, server and app.

Images:
- PNG / JPEG / TIFF (and anything else Pillow opens); 16-bit and float images are scaled to 8 bits by a
  window (explicit, else their own min/max).
- DICOM through pydicom: the modality LUT (Rescale Slope/Intercept), then a window — the file's Window
  Center/Width by default, a named preset (``ct-abdomen``, ``ct-lung``, ``ct-bone``, ``ct-brain``,
  ``ct-liver``) or an explicit ``"C,W"`` — then MONOCHROME1 inverted; multi-frame files give one frame;
  compressed transfer syntaxes decode through the pylibjpeg plugins.
- NIfTI (``.nii`` / ``.nii.gz``) through nibabel: one slice along an axis, in a fixed display orientation
  (the volume is brought to RAS+ first; rows run superior/anterior at the top, radiological left-right);
  :class:`NiftiVolume` keeps the affine so that masks drawn on slices go back into the original voxel grid.

Masks: PNG (non-zero is foreground), NIfTI label volumes (a slice, optionally one label value), COCO RLE
and polygons (pycocotools).

A *reference* names an image or mask in a dataset row: a path string, optionally with a fragment
(``scan.nii.gz#slice=40&axis=2``, ``cine.dcm#frame=3&window=ct-lung``, ``labels.nii.gz#slice=40&label=2,10``),
or a dict with the same keys plus ``path`` (``{"path": "scan.dcm", "window": "40,400"}``). Masks may also be
inline dicts: COCO RLE ``{"size": [h, w], "counts": ...}`` or ``{"polygons": [[x, y, ...]], "size": [h, w]}``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

# Hounsfield-unit windows (center, width); the usual radiology defaults.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct-abdomen": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
    "ct-liver": (30.0, 150.0),
}
# Larger than any single radiograph or CT slice; a file claiming more pixels is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 2**27
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
_REF_KEYS = {"path", "frame", "axis", "slice", "t", "window", "label"}


class MedicalImageError(ValueError):
    """An image or mask that cannot be read; ``reason`` is a short key used to count skipped rows."""

    def __init__(self, message: str, reason: str = "unreadable_image") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Window:
    """A linear VOI window: values ``center ± width/2`` map to black..white."""

    center: float
    width: float


@dataclass
class MediaRef:
    """A parsed image or mask reference (see the module docstring)."""

    path: Path
    frame: int | None = None
    axis: int | None = None
    slice: int | None = None
    t: int | None = None
    window: str | None = None
    label: tuple[int, ...] | None = None  # mask values counted as foreground (default: any non-zero)

    @property
    def kind(self) -> str:
        """``dicom``, ``nifti`` or ``raster`` (anything Pillow reads), by file name."""
        name = self.path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            return "nifti"
        if name.endswith(DICOM_SUFFIXES):
            return "dicom"
        if self.path.suffix == "" and self.path.is_file() and _has_dicom_preamble(self.path):
            return "dicom"
        return "raster"


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def parse_window(spec: str | Window | tuple[float, float] | None) -> Window | None:
    """``None``/``"file"`` -> ``None`` (use the file's own window); a preset name or ``"C,W"`` -> a :class:`Window`."""
    if spec is None or isinstance(spec, Window):
        return spec
    if isinstance(spec, tuple):
        return Window(float(spec[0]), float(spec[1]))
    text = str(spec).strip().lower()
    if text in ("", "file", "auto"):
        return None
    if text in WINDOW_PRESETS:
        return Window(*WINDOW_PRESETS[text])
    parts = text.split(",")
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if width <= 0:
                raise MedicalImageError(f"window {spec!r}: the width must be positive", "bad_reference")
            return Window(center, width)
    raise MedicalImageError(
        f"unknown window {spec!r}: use 'file', a preset ({', '.join(WINDOW_PRESETS)}) or 'CENTER,WIDTH' "
        "such as '40,400'",
        "bad_reference",
    )


def parse_ref(ref: str | Path | Mapping[str, Any], base_dir: str | Path | None = None) -> MediaRef:
    """Parse a reference (path string with optional ``#key=value&...`` fragment, or a dict with ``path``).

    Relative paths are resolved against ``base_dir`` (the JSONL file's folder).
    """
    if isinstance(ref, Mapping):
        unknown = set(ref) - _REF_KEYS
        if "path" not in ref or unknown:
            raise MedicalImageError(
                f"reference {dict(ref)!r}: a dict reference needs 'path' and may have {sorted(_REF_KEYS - {'path'})}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else ""),
                "bad_reference",
            )
        path_text, options = str(ref["path"]), {k: v for k, v in ref.items() if k != "path"}
    else:
        path_text, options = str(ref), {}
        if "#" in path_text:
            head, _, fragment = path_text.rpartition("#")
            pairs = parse_qsl(fragment, keep_blank_values=True)
            # a '#' that is part of a real file name stays in the path
            if pairs and all(key in _REF_KEYS - {"path"} for key, _ in pairs):
                path_text, options = head, dict(pairs)
    path = Path(path_text).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    parsed = MediaRef(path=path, window=None if options.get("window") is None else str(options["window"]))
    label = options.get("label")
    if label is not None:
        values = label if isinstance(label, (list, tuple)) else str(label).split(",")
        try:
            parsed.label = tuple(int(v) for v in values)
        except (TypeError, ValueError) as err:
            raise MedicalImageError(
                f"reference {ref!r}: label={label!r} must be an integer or a comma-separated list of integers",
                "bad_reference",
            ) from err
    for key in ("frame", "axis", "slice", "t"):
        if options.get(key) is not None:
            try:
                setattr(parsed, key, int(options[key]))
            except (TypeError, ValueError) as err:
                raise MedicalImageError(
                    f"reference {ref!r}: {key}={options[key]!r} is not an integer", "bad_reference"
                ) from err
    if parsed.axis is not None and parsed.axis not in (0, 1, 2):
        raise MedicalImageError(f"reference {ref!r}: axis must be 0, 1 or 2", "bad_reference")
    return parsed


# --- windowing -----------------------------------------------------------------------------------------------
def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2) to 8 bits."""
    center, width = float(window.center), max(float(window.width), 1.0)
    scaled = ((values.astype(np.float64) - (center - 0.5)) / (width - 1.0) + 0.5) if width > 1 else None
    if scaled is None:  # width 1: a threshold
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def full_range_window(values: np.ndarray) -> Window:
    """The window spanning an array's own min..max (what an image without window information gets)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return Window(0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    return Window((lo + hi + 1.0) / 2.0, max(hi - lo + 1.0, 1.0))


def _check_pixels(path: Path, pixels: int, max_pixels: int | None) -> None:
    if max_pixels is not None and pixels > max_pixels:
        raise MedicalImageError(
            f"{path}: {pixels} pixels is over the limit of {max_pixels} (a decompression bomb or a huge image). "
            "Fix: downsample the image, or raise the limit (--max-image-pixels)",
            "image_too_large",
        )


# --- DICOM ---------------------------------------------------------------------------------------------------
@dataclass
class DicomImage:
    """One decoded DICOM frame: modality values (e.g. Hounsfield units) or RGB, and how to display them."""

    values: np.ndarray  # [H, W] float64 after the modality LUT, or [H, W, 3] uint8 for colour
    photometric: str
    window: Window | None  # the file's own window (first value), if any
    frame: int
    num_frames: int

    def to_uint8(self, window: str | Window | None = None) -> np.ndarray:
        """8-bit display pixels: the given window, else the file's, else full range; MONOCHROME1 inverted."""
        if self.values.ndim == 3:
            return self.values
        chosen = parse_window(window) or self.window or full_range_window(self.values)
        pixels = apply_window(self.values, chosen)
        return 255 - pixels if self.photometric == "MONOCHROME1" else pixels


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _functional_group(ds: Any, frame: int, sequence: str) -> Any | None:
    """An item of a functional-group sequence for ``frame`` (per-frame first, then shared), for enhanced files."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index and sequence in seq[index]:
            items = seq[index][sequence]
            if len(items):
                return items[0]
    return None


def read_dicom(
    path: str | Path, frame: int | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> DicomImage:
    """Decode one frame of a DICOM file to modality values (rescale slope/intercept applied)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, pixel_array

    path = Path(path)
    if not path.is_file():
        raise MedicalImageError(f"image file not found: {path}", "missing_file")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise MedicalImageError(f"{path}: not a readable DICOM file ({err})", "unreadable_image") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise MedicalImageError(f"{path}: the DICOM file has no pixel data", "unreadable_image")
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        num_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as err:
        raise MedicalImageError(
            f"{path}: Rows, Columns or NumberOfFrames is not an integer ({err})", "unreadable_image"
        ) from err
    _check_pixels(path, rows * cols, max_pixels)
    index = 0 if frame is None else int(frame)
    if not 0 <= index < num_frames:
        raise MedicalImageError(
            f"{path}: frame {index} does not exist; the file has {num_frames} frame(s) (0..{num_frames - 1})",
            "bad_reference",
        )
    try:
        raw = pixel_array(ds, index=index) if num_frames > 1 else ds.pixel_array
    except Exception as err:  # decoders raise many types: missing plugin, truncated data, bad stream
        raise MedicalImageError(
            f"{path}: cannot decode the pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): {err}. Fix: "
            "check the file is complete; compressed syntaxes need pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg",
            "unreadable_image",
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if not (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[-1] == 3)) or raw.size == 0:
        raise MedicalImageError(
            f"{path}: decoded pixels have shape {tuple(raw.shape)}, not one grey or RGB frame: Rows, Columns, "
            "SamplesPerPixel or NumberOfFrames contradict the pixel data",
            "unreadable_image",
        )
    if raw.ndim == 3:  # colour; pydicom converts YBR to RGB
        return DicomImage(_to_uint8_rgb(raw), photometric, None, index, num_frames)
    try:
        transform = _functional_group(ds, index, "PixelValueTransformationSequence")
        if transform is not None and "RescaleSlope" in transform:
            slope, intercept = float(transform.RescaleSlope), float(transform.get("RescaleIntercept", 0))
            values = raw.astype(np.float64) * slope + intercept
        else:
            values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    except (TypeError, ValueError, AttributeError) as err:
        raise MedicalImageError(f"{path}: unusable modality LUT / RescaleSlope / RescaleIntercept ({err})") from err
    if not np.isfinite(values).all():
        raise MedicalImageError(
            f"{path}: pixel values are not finite after RescaleSlope/RescaleIntercept; fix those tags",
            "unreadable_image",
        )
    try:
        voi = _functional_group(ds, index, "FrameVOILUTSequence")
        source = voi if voi is not None and "WindowCenter" in voi else ds
        center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
    except (TypeError, ValueError):  # an unreadable window is ignored: the full range is shown instead
        center = width = None
    usable = center is not None and width is not None and np.isfinite([center, width]).all() and width > 0
    window = Window(center, width) if usable else None
    return DicomImage(values, photometric, window, index, num_frames)


def _to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return apply_window(array, full_range_window(array))


# --- NIfTI ---------------------------------------------------------------------------------------------------
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
    if not path.is_file():
        raise MedicalImageError(f"image file not found: {path}", "missing_file")
    stat = path.stat()
    return _read_nifti_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, t, max_pixels)


@functools.lru_cache(maxsize=2)
def _read_nifti_cached(path: str, _mtime: int, _size: int, t: int | None, max_pixels: int | None) -> NiftiVolume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.orientations import apply_orientation, io_orientation

    path = Path(path)
    try:
        image = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as err:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({err})", "unreadable_image") from err
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    # a volume holds many slices: allow 64 images' worth of voxels before calling it a bomb
    _check_pixels(path, int(np.prod(shape[:3])), None if max_pixels is None else max_pixels * 64)
    try:
        proxy = image.dataobj
        if len(image.shape) > 3:
            count = int(np.prod(image.shape[3:]))
            index = 0 if t is None else int(t)
            if not 0 <= index < count:
                raise MedicalImageError(f"{path}: volume t={index} is outside 0..{count - 1}", "bad_reference")
            if len(image.shape) == 4:
                data = np.asarray(proxy[..., index])  # reads only that volume
            else:
                data = np.asarray(proxy).reshape(shape[:3] + (-1,))[..., index]
        else:
            data = np.asarray(proxy).reshape(shape[:3])
    except MedicalImageError:
        raise
    except Exception as err:  # gzip and array readers raise varied types on truncated files
        raise MedicalImageError(f"{path}: truncated or unreadable voxel data ({err})", "truncated_image") from err
    ornt = io_orientation(image.affine)
    return NiftiVolume(apply_orientation(data, ornt), np.asarray(image.affine), shape[:3], ornt, image.header)


# --- images --------------------------------------------------------------------------------------------------
def _gray_to_pil(array: np.ndarray, window: Window | None) -> Image.Image:
    if array.dtype == np.uint8 and window is None:
        return Image.fromarray(array).convert("RGB")
    pixels = apply_window(array, window or full_range_window(array))
    return Image.fromarray(pixels).convert("RGB")


def _open_raster(path: Path, max_pixels: int | None) -> Image.Image:
    if not path.is_file():
        raise MedicalImageError(f"image file not found: {path}", "missing_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            opened = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MedicalImageError(f"{path}: {err}", "image_too_large") from err
    except OSError as err:
        raise MedicalImageError(f"{path}: not a readable image ({err})", "unreadable_image") from err
    width, height = opened.size
    _check_pixels(path, width * height, max_pixels)
    return opened


def read_raster(path: str | Path, window: str | Window | None = None, max_pixels: int | None = None) -> Image.Image:
    """PNG / JPEG / TIFF to RGB; 16-bit or float images go through ``window`` (default: their min/max)."""
    path = Path(path)
    opened = _open_raster(path, DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    try:
        with opened:
            opened.load()
            if opened.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _gray_to_pil(np.asarray(opened), parse_window(window))
            if window is not None and opened.mode == "L":
                return _gray_to_pil(np.asarray(opened).astype(np.float64), parse_window(window))
            return opened.convert("RGB")
    except OSError as err:
        raise MedicalImageError(
            f"{path}: truncated or corrupt image data ({err}). Fix: re-export the file", "truncated_image"
        ) from err


def read_image(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    window: str | Window | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Read any supported image reference as an 8-bit RGB PIL image.

    ``window`` applies when the reference names none (``"file"``/None: the file's own window or full range).
    """
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    chosen = parsed.window if parsed.window is not None else window
    kind = parsed.kind
    if kind == "dicom":
        return Image.fromarray(read_dicom(parsed.path, parsed.frame, max_pixels).to_uint8(chosen)).convert("RGB")
    if kind == "nifti":
        volume = read_nifti(parsed.path, parsed.t, max_pixels)
        axis = 2 if parsed.axis is None else parsed.axis
        plane = volume.slice(parsed.slice, axis)
        _check_pixels(parsed.path, plane.size, max_pixels)
        # one window for the whole volume, so that every slice of a series looks alike
        return Image.fromarray(apply_window(plane, parse_window(chosen) or full_range_window(volume.data))).convert(
            "RGB"
        )
    return read_raster(parsed.path, chosen, max_pixels)


def image_size(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[int, int]:
    """``(width, height)`` of an image reference from its header only (no pixel decoding)."""
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    if not parsed.path.is_file():
        raise MedicalImageError(f"image file not found: {parsed.path}", "missing_file")
    kind = parsed.kind
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(parsed.path, stop_before_pixels=True)
            width, height = int(ds.Columns), int(ds.Rows)
        except Exception as err:  # pydicom raises several types for broken headers
            raise MedicalImageError(f"{parsed.path}: not a readable DICOM file ({err})", "unreadable_image") from err
        _check_pixels(parsed.path, width * height, max_pixels)
        return width, height
    if kind == "nifti":
        import nibabel as nib

        try:
            image = nib.load(parsed.path)
        except Exception as err:  # nibabel raises several types for broken headers
            raise MedicalImageError(f"{parsed.path}: not a readable NIfTI file ({err})", "unreadable_image") from err
        from nibabel.orientations import io_orientation

        shape = list(image.shape[:3]) + [1] * (3 - len(image.shape[:3]))
        ornt = io_orientation(image.affine)
        canonical = [0, 0, 0]
        for src, (dst, _flip) in enumerate(ornt):
            canonical[int(dst)] = shape[src]
        axis = 2 if parsed.axis is None else parsed.axis
        rest = [canonical[k] for k in range(3) if k != axis]  # display is the transposed plane
        return int(rest[0]), int(rest[1])
    with _open_raster(parsed.path, max_pixels) as opened:
        return opened.size


# --- masks ---------------------------------------------------------------------------------------------------
def _mask_size(value: Any, what: str) -> tuple[int, int]:
    """``[h, w]`` of a mask object as two positive integers, or a ``bad_mask`` error saying what is wrong."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise MedicalImageError(
            f"{what} needs 'size' [height, width] as two positive integers, got {value!r}", "bad_mask"
        )
    return int(value[0]), int(value[1])


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed string or uncompressed list ``counts``) to a boolean ``[H, W]`` mask."""
    from pycocotools import mask as mask_utils

    if "size" not in rle or "counts" not in rle:
        raise MedicalImageError("a COCO RLE mask needs 'size' [h, w] and 'counts'", "bad_mask")
    height, width = _mask_size(rle["size"], "a COCO RLE mask")
    counts = rle["counts"]
    if not isinstance(counts, (str, bytes, list)):
        raise MedicalImageError(f"COCO RLE counts must be a string or a list of integers, got {counts!r}", "bad_mask")
    try:
        if isinstance(counts, list):
            encoded = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            encoded = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 copy= notice
            decoded = mask_utils.decode(encoded)
    except Exception as err:  # pycocotools raises bare exceptions on malformed counts
        raise MedicalImageError(f"invalid COCO RLE counts ({err})", "bad_mask") from err
    return decoded.astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean ``[H, W]`` mask as compressed COCO RLE with a JSON-ready string ``counts``."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixels) to a boolean mask."""
    from pycocotools import mask as mask_utils

    try:
        polys = [list(map(float, p)) for p in polygons]
    except (TypeError, ValueError) as err:
        raise MedicalImageError(f"polygons must be lists of numbers ({err})", "bad_mask") from err
    if not polys or any(len(p) < 6 or len(p) % 2 for p in polys):
        raise MedicalImageError("each polygon needs at least 3 (x, y) points as a flat list", "bad_mask")
    if not all(np.isfinite(p).all() for p in polys):
        raise MedicalImageError("polygon coordinates must be finite numbers", "bad_mask")
    rles = mask_utils.frPyObjects(polys, height, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 copy= notice
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def read_mask(
    ref: str | Path | Mapping[str, Any] | MediaRef,
    base_dir: str | Path | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a mask reference as a boolean ``[H, W]`` array (non-zero, or ``== label`` when a label is named).

    ``size`` is ``(width, height)`` of the image, needed by polygons without their own ``size``.
    """
    if isinstance(ref, Mapping) and "counts" in ref:
        return rle_to_mask(ref)
    if isinstance(ref, Mapping) and "polygons" in ref:
        if "size" in ref:
            height, width = _mask_size(ref["size"], "a polygon mask")
        elif size is not None:
            width, height = size
        else:
            raise MedicalImageError("a polygon mask needs 'size' [h, w] (or the image size)", "bad_mask")
        return polygons_to_mask(ref["polygons"], height, width)
    parsed = ref if isinstance(ref, MediaRef) else parse_ref(ref, base_dir)
    if parsed.kind == "nifti":
        volume = read_nifti(parsed.path, parsed.t, None)
        plane = volume.slice(parsed.slice, 2 if parsed.axis is None else parsed.axis)
        return np.isin(plane, parsed.label) if parsed.label is not None else plane > 0
    if parsed.kind == "dicom":
        values = read_dicom(parsed.path, parsed.frame, None).values
        if values.ndim == 3:  # a colour file: any channel counts, as for raster masks
            values = values.max(axis=-1)
        return np.isin(values, parsed.label) if parsed.label is not None else values > 0
    opened = _open_raster(parsed.path, None)
    try:
        with opened:
            array = np.asarray(opened)
    except OSError as err:
        raise MedicalImageError(f"{parsed.path}: truncated or corrupt mask ({err})", "truncated_image") from err
    if array.ndim == 3:
        array = array.max(axis=-1)
    return np.isin(array, parsed.label) if parsed.label is not None else array > 0


def read_label_map(ref: str | Path, base_dir: str | Path | None = None) -> np.ndarray:
    """Read a single-channel label image (PNG or another raster; 8 or 16 bit) as an integer ``[H, W]`` array.

    Used for training-only maps whose pixel values are classes (``text_map``), where a mask reader would
    binarise them.
    """
    parsed = parse_ref(ref, base_dir)
    if parsed.kind != "raster":
        raise MedicalImageError(f"{parsed.path}: a label map must be a raster image such as PNG", "bad_mask")
    opened = _open_raster(parsed.path, None)
    try:
        with opened:
            if opened.mode not in ("L", "I", "I;16", "P"):
                raise MedicalImageError(
                    f"{parsed.path}: a label map must have one channel of class numbers (mode {opened.mode})",
                    "bad_mask",
                )
            array = np.asarray(opened)
    except OSError as err:
        raise MedicalImageError(f"{parsed.path}: truncated or corrupt label map ({err})", "truncated_image") from err
    return array.astype(np.int64)
