"""A DICOM series: a folder or a zip of single-frame slices of one series, read as one volume.

Headers are read first (``stop_before_pixels``): the files are grouped by Series Instance UID (several series
are refused with the list of them and how to pick one), ordered by position along the slice normal
(Image Position Patient · the normal of Image Orientation Patient; Instance Number, with a warning, when
positions are missing), and checked to form one regular stack (one orientation, one size, one pixel spacing,
uniform slice distance: a gap or a duplicate position is refused naming the two files). Only then are the
pixels decoded, file by file, through each slice's own modality LUT. :func:`stack_geometry` is shared with
the multi-frame reader (enhanced CT/MR frames carry the same geometry per frame). pydicom is imported on first
use.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .dicom import _file_window, _modality_values, _to_uint8_rgb
from .errors import MedicalImageError
from .volume import DEFAULT_MAX_VOLUME_VOXELS, FrameReference, Volume, VolumeHeader
from .windowing import Window

# Two slices closer than this along the normal are one position twice (mm).
DUPLICATE_MM = 1e-3
# A step may differ from the series' usual step by this fraction (plus 0.01 mm) before it is a gap.
SPACING_TOLERANCE = 0.05
# Orientation cosines may differ by this much between slices of one stack.
ORIENTATION_TOLERANCE = 1e-4
# A file may hold this many bytes beyond its pixels (its header, padding) before it is refused as a bomb.
_HEADER_ALLOWANCE = 16 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class SliceFile:
    """One DICOM instance of a folder or zip: its name in messages, how to open it, its size, its header."""

    name: str
    opener: Callable[[], BinaryIO]
    size: int
    header: Any = field(repr=False, default=None)  # pydicom Dataset without pixel data

    @property
    def num_frames(self) -> int:
        return int(self.header.get("NumberOfFrames", 1) or 1)


@dataclass
class SeriesFiles:
    """The instances of the one series chosen in a folder or zip (headers read, no pixels yet)."""

    where: str
    series_uid: str
    slices: list[SliceFile]
    archive: zipfile.ZipFile | None = field(default=None, repr=False)

    @property
    def single_multiframe(self) -> bool:
        """One instance holding several frames: a multi-frame file that happens to sit in a folder."""
        return len(self.slices) == 1 and self.slices[0].num_frames > 1

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> SeriesFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class StackGeometry:
    """Where the frames of a stack lie: ``order`` (file order to stack order, along the normal), the distance
    between frames, and the ``(column, row, frame)`` -> patient LPS millimetre affine (``None`` without
    positions)."""

    order: list[int]
    slice_distance: float | None
    affine: np.ndarray | None


def is_zip(data: bytes) -> bool:
    return data[:4] == _ZIP_MAGIC


def collect_series(
    source: str | Path | bytes,
    name: str | None = None,
    series: str | None = None,
    max_file_bytes: int | None = None,
) -> SeriesFiles:
    """The headers of the one series in a folder, a ``.zip`` file, or zip bytes (``name`` names them).

    Files that are not DICOM images (a DICOMDIR, a report, a text file) are skipped with a warning naming them;
    several series are refused unless ``series`` picks one. A file (or zip member, by its stated size) over
    ``max_file_bytes`` is refused before it is read.
    """
    if isinstance(source, bytes):
        where = name or "the zip data"
        archive = _open_zip(io.BytesIO(source), where)
        files = _zip_files(archive, where)
    else:
        path = Path(source)
        where = str(path)
        if path.is_dir():
            archive, files = None, _folder_files(path)
        elif path.is_file():
            archive = _open_zip(path, where)
            files = _zip_files(archive, where)
        else:
            raise MedicalImageError(f"image file not found: {path}", "missing_file")
    try:
        _check_file_sizes(files, max_file_bytes)
        slices = _read_headers(files, where)
        uid, chosen = _select_series(slices, series, where)
    except BaseException:
        if archive is not None:
            archive.close()
        raise
    return SeriesFiles(where, uid, chosen, archive)


def _open_zip(file: str | Path | BinaryIO, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise MedicalImageError(
            f"{where}: not a readable zip file ({err}). Fix: send a .zip of the series' DICOM files",
            "unreadable_image",
        ) from err


def _hidden(parts: Sequence[str]) -> bool:
    """Operating-system metadata (``.DS_Store``, ``__MACOSX/``), never a slice."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _folder_files(folder: Path) -> list[SliceFile]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not _hidden(path.relative_to(folder).parts):
            files.append(SliceFile(str(path), (lambda p=path: open(p, "rb")), path.stat().st_size))
    return files


def _zip_files(archive: zipfile.ZipFile, where: str) -> list[SliceFile]:
    files = []
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if not info.is_dir() and not _hidden(info.filename.split("/")):
            files.append(
                SliceFile(f"{where}:{info.filename}", (lambda i=info: archive.open(i)), int(info.file_size))
            )
    return files


def file_bytes_limit(max_voxels: int | None) -> int | None:
    """The largest file a volume of ``max_voxels`` can need: 8 bytes a voxel and a header."""
    return None if max_voxels is None else 8 * max_voxels + _HEADER_ALLOWANCE


def _check_file_sizes(files: list[SliceFile], max_file_bytes: int | None) -> None:
    for item in files:
        if max_file_bytes is not None and item.size > max_file_bytes:
            raise MedicalImageError(
                f"{item.name}: {item.size} bytes is more than a volume within the voxel limit can hold "
                f"({max_file_bytes} bytes; a decompression bomb or a huge file). Fix: remove the file, or raise "
                "the limit (--max_voxels)",
                "image_too_large",
            )


def _read_headers(files: list[SliceFile], where: str) -> list[SliceFile]:
    """Each file's header (no pixels); files that are not DICOM images are set aside with a warning."""
    from pydicom.errors import InvalidDicomError

    slices, skipped = [], []
    for item in files:
        try:
            header = read_dicom_header(item)
        except InvalidDicomError:
            skipped.append(f"{item.name} (not DICOM)")
            continue
        except MedicalImageError:
            raise
        except Exception as err:  # pydicom raises many types for a damaged header; the file is named, not read
            skipped.append(f"{item.name} (unreadable DICOM header: {str(err)[:80]})")
            continue
        if "Rows" not in header or "Columns" not in header:
            skipped.append(f"{item.name} (a DICOM file without an image: {_sop_name(header)})")
            continue
        item.header = header
        slices.append(item)
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"{where}: {len(skipped)} file(s) are not readable DICOM images and were skipped: {shown}",
                      stacklevel=3)
    if not slices:
        raise MedicalImageError(
            f"{where}: no DICOM image found ({len(files)} file(s) looked at). Fix: give the folder or zip that "
            "holds the series' .dcm files",
            "unreadable_image",
        )
    return slices


def transfer_syntax(item: SliceFile) -> str | None:
    """The Transfer Syntax UID of the file meta, read without parsing the dataset; ``None`` without file meta."""
    from pydicom.filereader import read_dataset, read_preamble

    try:
        with item.opener() as handle:
            read_preamble(handle, False)
            meta = read_dataset(handle, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    except Exception:  # no preamble, a broken file meta: the dataset read that follows says what is wrong
        return None
    return str(meta.get("TransferSyntaxUID", "")) or None


def read_dicom_header(item: SliceFile) -> Any:
    """The header of one file (``stop_before_pixels``). A file in the deflated transfer syntax is refused first:
    pydicom inflates the whole dataset to read even its header, however large it inflates."""
    import pydicom

    if transfer_syntax(item) == DEFLATED:
        raise MedicalImageError(
            f"{item.name}: the deflated transfer syntax is not read as part of a volume (the whole file would be "
            "inflated to read its header). Fix: store it uncompressed or in a compressed pixel syntax (e.g. dcmtk's "
            "dcmconv +te), or send the file alone as an image",
            "unsupported_image",
        )
    with item.opener() as handle:
        return pydicom.dcmread(handle, stop_before_pixels=True)


def _sop_name(header: Any) -> str:
    uid = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", "?")
    return str(getattr(uid, "name", uid))


def _select_series(slices: list[SliceFile], series: str | None, where: str) -> tuple[str, list[SliceFile]]:
    groups: dict[str, list[SliceFile]] = {}
    for item in slices:
        groups.setdefault(str(item.header.get("SeriesInstanceUID", "")), []).append(item)
    if series is not None:
        if series not in groups:
            raise MedicalImageError(
                f"{where}: no series {series!r}; it holds {_describe_series(groups)}", "bad_reference"
            )
        return series, groups[series]
    if len(groups) > 1:
        raise MedicalImageError(
            f"{where}: holds {len(groups)} series, a volume is one: {_describe_series(groups)}. Fix: pick one "
            f"with '{where}#series=<SeriesInstanceUID>', or give the sub-folder that holds it",
            "mixed_series",
        )
    uid = next(iter(groups))
    return uid, groups[uid]


def _describe_series(groups: dict[str, list[SliceFile]]) -> str:
    parts = []
    for uid, items in groups.items():
        head = items[0].header
        what = " ".join(str(v) for v in (head.get("Modality"), head.get("SeriesDescription")) if v)
        parts.append(f"{uid or '(no UID)'} ({what + ', ' if what else ''}{len(items)} file(s), e.g. {items[0].name})")
    return "; ".join(parts)


def stack_geometry(
    positions: list[Any] | None,
    orientations: list[Any] | None,
    pixel_spacing: tuple[float, float] | None,
    names: list[str],
    fallback_distance: float | None = None,
) -> StackGeometry:
    """Order frames along the normal of their (one) orientation and check the steps are uniform.

    ``positions`` / ``orientations``: per frame Image Position / Orientation Patient (``None`` when any is
    missing: the caller orders the frames itself). ``names`` name frame ``k`` in messages.
    """
    if positions is None or orientations is None:
        return StackGeometry(list(range(len(names))), fallback_distance, None)
    cosines = np.asarray(orientations, dtype=np.float64).reshape(len(names), 6)
    for k in range(1, len(names)):
        if not np.allclose(cosines[k], cosines[0], atol=ORIENTATION_TOLERANCE):
            raise MedicalImageError(
                f"{names[k]} is oriented {cosines[k].round(4).tolist()} but {names[0]} "
                f"{cosines[0].round(4).tolist()}: one volume has one orientation. Fix: give the slices of one "
                "acquisition plane only (a localizer or a reformat is a series of its own)",
                "mixed_series",
            )
    row_dir, col_dir = cosines[0, :3], cosines[0, 3:]
    normal = np.cross(row_dir, col_dir)
    points = np.asarray(positions, dtype=np.float64).reshape(len(names), 3)
    along = points @ normal
    order = [int(k) for k in np.argsort(along, kind="stable")]
    distance = _uniform_step(along[order], [names[k] for k in order])
    if distance is None:
        distance = fallback_distance
    affine = None
    if pixel_spacing is not None:
        step = (points[order[-1]] - points[order[0]]) / (len(order) - 1) if len(order) > 1 else normal * (
            distance or 1.0
        )
        affine = np.eye(4)
        affine[:3, 0] = row_dir * pixel_spacing[1]  # along a row: the column index
        affine[:3, 1] = col_dir * pixel_spacing[0]  # down a column: the row index
        affine[:3, 2] = step
        affine[:3, 3] = points[order[0]]
    return StackGeometry(order, distance, affine)


def _uniform_step(along: np.ndarray, names: list[str]) -> float | None:
    """The one distance between consecutive frames (``None`` for a single frame); a duplicate position or
    an uneven step is refused naming the two frames."""
    if len(along) < 2:
        return None
    steps = np.diff(along)
    for k, step in enumerate(steps):
        if step < DUPLICATE_MM:
            raise MedicalImageError(
                f"{names[k]} and {names[k + 1]} lie at the same position along the slice normal ({along[k]:.4g} "
                f"mm, {step:.3g} mm apart): a duplicate slice, or two acquisitions in one series. Fix: remove "
                "the duplicate, or give one acquisition (echo, phase, time point) only",
                "uneven_spacing",
            )
    usual = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - usual) > SPACING_TOLERANCE * usual + 0.01:
            raise MedicalImageError(
                f"{names[k]} and {names[k + 1]} are {step:.4g} mm apart where the series steps {usual:.4g} mm "
                f"({'a missing slice?' if step > usual else 'uneven spacing'}). Fix: give the complete "
                "series, or resample it to an even spacing (e.g. convert it to NIfTI with dcm2niix)",
                "uneven_spacing",
            )
    return usual


def _pixel_spacing(header: Any) -> tuple[float, float] | None:
    value = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    if value is None or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


def _check_same(slices: list[SliceFile], keyword: str, what: str) -> None:
    first = slices[0].header.get(keyword)
    for item in slices[1:]:
        value = item.header.get(keyword)
        if value != first:
            raise MedicalImageError(
                f"{item.name} has {what} {value} but {slices[0].name} {first}: the slices of one volume share "
                f"it. Fix: give the slices of one series and one acquisition only",
                "mixed_series",
            )


def _order_by_instance(slices: list[SliceFile], where: str) -> list[int]:
    """File order by Instance Number, for slices without positions (warned: spacing cannot be checked)."""
    numbers = [item.header.get("InstanceNumber") for item in slices]
    if any(n is None for n in numbers):
        missing = next(item.name for item, n in zip(slices, numbers, strict=True) if n is None)
        raise MedicalImageError(
            f"{where}: the slices carry neither Image Position/Orientation Patient nor Instance Number "
            f"({missing}), so their order is unknown. Fix: export the series with its geometry",
            "unreadable_image",
        )
    order = sorted(range(len(slices)), key=lambda k: int(numbers[k]))
    for a, b in zip(order, order[1:], strict=False):
        if int(numbers[a]) == int(numbers[b]):
            raise MedicalImageError(
                f"{slices[a].name} and {slices[b].name} share Instance Number {numbers[a]} and carry no position: "
                "a duplicate slice. Fix: remove it",
                "uneven_spacing",
            )
    warnings.warn(
        f"{where}: the slices carry no Image Position/Orientation Patient; ordered by Instance Number, spacing "
        "unchecked",
        stacklevel=4,
    )
    return order


def series_geometry(files: SeriesFiles) -> StackGeometry:
    """The stack order and geometry of a collected series, after checking the slices agree."""
    slices = files.slices
    multi = [item.name for item in slices if item.num_frames > 1]
    if multi:
        raise MedicalImageError(
            f"{files.where}: series {files.series_uid} mixes multi-frame files ({multi[0]}) with other files. "
            "Fix: give the multi-frame file itself",
            "mixed_series",
        )
    for keyword, what in (("Rows", "Rows"), ("Columns", "Columns"), ("SamplesPerPixel", "SamplesPerPixel")):
        _check_same(slices, keyword, what)
    spacing = _pixel_spacing(slices[0].header)
    for item in slices[1:]:
        other = _pixel_spacing(item.header)
        if (other is None) != (spacing is None) or (other and not np.allclose(other, spacing, rtol=1e-3)):
            raise MedicalImageError(
                f"{item.name} has PixelSpacing {other} but {slices[0].name} {spacing}: one volume has one pixel "
                "spacing. Fix: give the slices of one series and one reconstruction only",
                "mixed_series",
            )
    names = [item.name for item in slices]
    fallback = _fallback_distance(slices[0].header)
    positions = [item.header.get("ImagePositionPatient") for item in slices]
    orientations = [item.header.get("ImageOrientationPatient") for item in slices]
    if any(p is None or len(p) != 3 for p in positions) or any(o is None or len(o) != 6 for o in orientations):
        order = _order_by_instance(slices, files.where) if len(slices) > 1 else [0]
        return StackGeometry(order, fallback, None)
    return stack_geometry(positions, orientations, spacing, names, fallback)


def _fallback_distance(header: Any) -> float | None:
    """The stated slice distance (Spacing Between Slices, else Slice Thickness), for stacks without positions."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = header.get(keyword)
        if value not in (None, ""):
            return abs(float(value))
    return None


def probe_dicom_series(files: SeriesFiles) -> VolumeHeader:
    """The size of a collected series, from its headers."""
    head = files.slices[0].header
    return VolumeHeader(files.where, "volume", len(files.slices), int(head.Rows), int(head.Columns),
                        output_samples(head))


def output_samples(header: Any) -> int:
    """3 for colour frames (RGB, YBR, or grey indices through a palette), else 1."""
    colour = int(header.get("SamplesPerPixel", 1) or 1) == 3
    return 3 if colour or str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR" else 1


def colour_frame(raw: np.ndarray, header: Any) -> np.ndarray:
    """A decoded colour frame as ``[H, W, 3]`` uint8: RGB as decoded (pydicom converts YBR), palette
    indices through the file's colour table."""
    from pydicom.pixels import apply_color_lut

    if raw.ndim == 2:  # PALETTE COLOR: indices into the red/green/blue tables
        rgb = apply_color_lut(raw, header)
        descriptor = header.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 16
        return (rgb >> 8).astype(np.uint8) if bits > 8 and rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    return _to_uint8_rgb(raw)


def read_dicom_series(
    files: SeriesFiles,
    frames: list[int] | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS,
    max_frames: int | None = None,
    window: Window | None = None,
) -> Volume:
    """Decode a collected series into a :class:`Volume`, frames ordered along the normal.

    ``frames`` (indices in that order) decodes those slices only; the voxel and frame limits apply to what is
    decoded, and are checked before any pixel is.
    """
    geometry = series_geometry(files)
    chosen = probe_dicom_series(files).check(max_voxels, max_frames, frames)
    ordered = [files.slices[geometry.order[k]] for k in chosen]
    values = _decode_slices(ordered)
    head = ordered[0].header
    pixel = _pixel_spacing(files.slices[geometry.order[0]].header)
    spacing = None
    if pixel is not None and geometry.slice_distance is not None:
        spacing = (float(geometry.slice_distance), pixel[0], pixel[1])
    return Volume(
        values=values,
        kind="volume",
        source=files.where,
        spacing=spacing,
        affine=geometry.affine,
        window=window or (None if values.ndim == 4 else _file_window(head, 0)),
        photometric=str(head.get("PhotometricInterpretation", "MONOCHROME2")),
        references=[
            FrameReference(str(s.header.SOPClassUID), str(s.header.SOPInstanceUID), None, s.name) for s in ordered
        ],
        datasets=[s.header for s in ordered],
        source_frames=None if frames is None else chosen,
    )


def _decode_slices(ordered: list[SliceFile]) -> np.ndarray:
    """``[N, H, W]`` float32 modality values (each slice through its own rescale), or ``[N, H, W, 3]`` uint8."""
    head = ordered[0].header
    rows, cols, samples = int(head.Rows), int(head.Columns), output_samples(head)
    shape = (len(ordered), rows, cols) + ((3,) if samples == 3 else ())
    values = np.empty(shape, dtype=np.uint8 if samples == 3 else np.float32)
    stored = int(head.get("SamplesPerPixel", 1) or 1) * -(-int(head.get("BitsAllocated", 16)) // 8)
    for k, item in enumerate(ordered):
        ds = read_dataset_with_pixels(item, rows * cols * stored)
        raw = _decode_one(item, ds)
        if raw.shape[:2] != (rows, cols):
            raise MedicalImageError(
                f"{item.name}: decoded pixels have shape {tuple(raw.shape)}, not Rows x Columns {rows}x{cols}",
                "unreadable_image",
            )
        values[k] = colour_frame(raw, ds) if samples == 3 else _modality_values(Path(item.name), ds, 0, raw)
    return values


def read_dataset_with_pixels(item: SliceFile, pixel_bytes: int) -> Any:
    """The whole dataset of one file, once its size fits the ``pixel_bytes`` its header declares (twice that,
    and a header allowance)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if item.size > 2 * pixel_bytes + _HEADER_ALLOWANCE:
        raise MedicalImageError(
            f"{item.name}: {item.size} bytes for a {pixel_bytes}-byte image (a decompression bomb or a corrupt "
            "file). Fix: re-export the slice",
            "image_too_large",
        )
    try:
        with item.opener() as handle:
            return pydicom.dcmread(handle)
    except (InvalidDicomError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise MedicalImageError(f"{item.name}: not a readable DICOM file ({err})", "unreadable_image") from err


def check_encoded_frame(item: SliceFile, ds: Any, index: int) -> None:
    """A compressed frame whose codestream declares more pixels than Rows x Columns is refused before it is
    decoded (a decoder allocates what its codestream says); native (uncompressed) data passes."""
    from pydicom.encaps import get_frame

    from .dicom_source import codestream_size

    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    size = codestream_size(get_frame(ds.PixelData, index, extended_offsets=extended, number_of_frames=frames))
    if size is not None and size[0] * size[1] > int(ds.Rows) * int(ds.Columns):
        raise MedicalImageError(
            f"{item.name}: frame {index + 1}'s compressed data declares {size[0]} x {size[1]} pixels, more than the "
            f"file's Columns x Rows ({ds.Columns} x {ds.Rows}); refused before decoding. Fix: re-encode the file",
            "unreadable_image",
        )


def _decode_one(item: SliceFile, ds: Any) -> np.ndarray:
    try:
        check_encoded_frame(item, ds, 0)
        return ds.pixel_array
    except MedicalImageError:
        raise
    except Exception as err:  # decoders raise many types: missing plugin, truncated data, bad stream
        raise MedicalImageError(
            f"{item.name}: cannot decode the pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): {err}. Fix: "
            "check the file is complete; compressed syntaxes need pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg",
            "unreadable_image",
        ) from err
