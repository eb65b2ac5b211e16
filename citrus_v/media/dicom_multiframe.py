"""A multi-frame DICOM file as a volume or a clip: enhanced CT/MR, ultrasound and angiography cine loops, any
file with Number of Frames.

The header is read first (``stop_before_pixels``) and the frame count, size and samples checked against the
limits; then only the frames asked for are decoded. Geometry comes from the enhanced files' functional groups
(Plane Position / Plane Orientation / Pixel Measures, per frame or shared) or from a classic multi-frame's
Image Position Patient with its Grid Frame Offset Vector (RT dose, NM); frames with positions are ordered
along the normal and checked for even spacing, as a series is. A cine loop (ultrasound, angiography,
endoscopy, or frames in time without positions) is a clip, with its frame rate from Frame Time, Frame Time
Vector, Cine Rate or Recommended Display Frame Rate. Each frame goes through its own modality LUT; palette
colour goes through the file's colour table. pydicom is imported on first use.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import _file_window, _functional_group, _modality_values
from .dicom_series import (
    SliceFile,
    StackGeometry,
    check_encoded_frame,
    colour_frame,
    output_samples,
    read_dataset_with_pixels,
    read_dicom_header,
    stack_geometry,
)
from .errors import MedicalImageError, require_file
from .volume import DEFAULT_MAX_VOLUME_VOXELS, FrameReference, Volume, VolumeHeader, VolumeKind
from .windowing import Window

# Modalities whose frames are moments in time, not positions in space.
CLIP_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "OP", "ECHO"})


def dicom_file(path: str | Path) -> SliceFile:
    """A DICOM file on disk as a :class:`SliceFile` (header not read yet)."""
    path = Path(path)
    require_file(path)
    return SliceFile(str(path), lambda: open(path, "rb"), path.stat().st_size)


def dicom_bytes(data: bytes, name: str) -> SliceFile:
    """The bytes of a DICOM file (a ``data:`` URL) as a :class:`SliceFile`; ``name`` names them in messages."""
    return SliceFile(name, lambda: io.BytesIO(data), len(data))


def read_header(item: SliceFile) -> Any:
    """The file's header without pixel data (kept on ``item``); a file without an image is refused."""
    if item.header is None:
        try:
            item.header = read_dicom_header(item)
        except MedicalImageError:
            raise
        except Exception as err:  # pydicom raises many types for a broken file
            raise MedicalImageError(f"{item.name}: not a readable DICOM file ({err})", "unreadable_image") from err
    if "Rows" not in item.header or "Columns" not in item.header:
        raise MedicalImageError(f"{item.name}: the DICOM file has no image (no Rows/Columns)", "unreadable_image")
    return item.header


def probe_dicom_multiframe(item: SliceFile) -> VolumeHeader:
    """Frames, size, samples and frame rate of a DICOM file, from its header."""
    header = read_header(item)
    try:
        num_frames = int(header.get("NumberOfFrames", 1) or 1)
        rows, cols = int(header.Rows), int(header.Columns)
    except (TypeError, ValueError) as err:
        raise MedicalImageError(
            f"{item.name}: Rows, Columns or NumberOfFrames is not an integer ({err})", "unreadable_image"
        ) from err
    if num_frames < 1 or rows < 1 or cols < 1:
        raise MedicalImageError(
            f"{item.name}: {num_frames} frame(s) of {rows}x{cols} pixels: no image", "unreadable_image"
        )
    kind = frame_kind(header)
    return VolumeHeader(item.name, kind, num_frames, rows, cols, output_samples(header),
                        frame_rate(header) if kind == "clip" else None)


def frame_kind(header: Any) -> VolumeKind:
    """``clip`` for frames in time (a cine modality, or a frame timing without positions), else ``volume``."""
    if str(header.get("Modality", "")).upper() in CLIP_MODALITIES:
        return "clip"
    timed = any(k in header for k in ("FrameTime", "FrameTimeVector", "CineRate"))
    return "clip" if timed and _positions(header) is None else "volume"


def frame_rate(header: Any) -> float | None:
    """Frames per second: 1000 / Frame Time (ms), the mean of Frame Time Vector, Cine Rate, or Recommended
    Display Frame Rate; ``None`` when the file states none."""
    try:
        frame_time = header.get("FrameTime")
        if frame_time not in (None, "") and float(frame_time) > 0:
            return 1000.0 / float(frame_time)
        vector = header.get("FrameTimeVector")
        if vector is not None and len(vector) > 1:  # the first entry is 0: the times between frames follow
            mean = float(np.mean([float(v) for v in list(vector)[1:]]))
            if mean > 0:
                return 1000.0 / mean
        for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
            value = header.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
    except (TypeError, ValueError):  # an unreadable timing is treated as absent: the clip has no frame rate
        return None
    return None


def _positions(header: Any) -> tuple[list[Any], list[Any]] | None:
    """Per-frame Image Position / Orientation Patient, from the functional groups or a grid offset vector;
    ``None`` when any frame lacks them."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    positions, orientations = [], []
    for k in range(frames):
        plane = _functional_group(header, k, "PlanePositionSequence")
        orient = _functional_group(header, k, "PlaneOrientationSequence")
        if plane is None or orient is None or "ImagePositionPatient" not in plane:
            break
        positions.append(plane.ImagePositionPatient)
        orientations.append(orient.get("ImageOrientationPatient"))
    else:
        if all(o is not None and len(o) == 6 for o in orientations):
            return positions, orientations
    return _grid_positions(header, frames)


def _grid_positions(header: Any, frames: int) -> tuple[list[Any], list[Any]] | None:
    """Classic multi-frame geometry: one position and orientation, frame ``k`` offset along the normal by
    Grid Frame Offset Vector[k] (mm)."""
    position, orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    offsets = header.get("GridFrameOffsetVector")
    if position is None or orientation is None or offsets is None or len(offsets) != frames or len(orientation) != 6:
        return None
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    origin = np.asarray(position, dtype=np.float64)
    return [list(origin + float(d) * normal) for d in offsets], [list(cosines)] * frames


def _pixel_measures(header: Any) -> tuple[tuple[float, float] | None, float | None]:
    """Pixel Spacing (row, column) and the stated slice distance, from Pixel Measures or the top level."""
    measures = _functional_group(header, 0, "PixelMeasuresSequence")
    source = measures if measures is not None and "PixelSpacing" in measures else header
    spacing = source.get("PixelSpacing")
    pixel = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    distance = None
    for where in (measures, header):
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = None if where is None else where.get(keyword)
            if distance is None and value not in (None, ""):
                distance = abs(float(value))
    return pixel, distance


def multiframe_geometry(item: SliceFile, kind: VolumeKind) -> tuple[StackGeometry, tuple[float, float] | None]:
    """Frame order and geometry (frames in file order for a clip or a stack without positions), and the
    pixel spacing."""
    header = read_header(item)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    pixel, distance = _pixel_measures(header)
    located = _positions(header) if kind == "volume" else None
    if located is None:
        return StackGeometry(list(range(frames)), distance if kind == "volume" else None, None), pixel
    names = [f"{item.name} frame {k + 1}" for k in range(frames)]
    return stack_geometry(located[0], located[1], pixel, names, distance), pixel


def read_dicom_multiframe(
    item: SliceFile,
    frames: list[int] | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS,
    max_frames: int | None = None,
    window: Window | None = None,
) -> Volume:
    """A DICOM file's frames as a :class:`Volume` (``frames``: only those, in stack order, are decoded)."""
    info = probe_dicom_multiframe(item)
    header = item.header
    geometry, pixel = multiframe_geometry(item, info.kind)
    chosen = info.check(max_voxels, max_frames, frames)
    file_frames = [geometry.order[k] for k in chosen]
    values = _decode_frames(item, header, file_frames, info)
    spacing = None
    if info.kind == "volume" and pixel is not None and geometry.slice_distance is not None:
        spacing = (float(geometry.slice_distance), pixel[0], pixel[1])
    sop_class, sop_instance = str(header.get("SOPClassUID", "")), str(header.get("SOPInstanceUID", ""))
    return Volume(
        values=values,
        kind=info.kind,
        source=item.name,
        spacing=spacing,
        affine=geometry.affine,
        window=window or (None if values.ndim == 4 else _file_window(header, geometry.order[0])),
        fps=info.fps,
        photometric=str(header.get("PhotometricInterpretation", "MONOCHROME2")),
        references=[FrameReference(sop_class, sop_instance, k + 1, item.name) for k in file_frames],
        datasets=[header],
        source_frames=None if frames is None else chosen,
    )


def _decode_frames(item: SliceFile, header: Any, file_frames: list[int], info: VolumeHeader) -> np.ndarray:
    """The chosen frames (file indices, in the order given): float32 modality values or uint8 RGB."""
    shape = (len(file_frames), info.height, info.width) + ((3,) if info.samples == 3 else ())
    values = np.empty(shape, dtype=np.uint8 if info.samples == 3 else np.float32)
    wanted = sorted(set(file_frames))
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(file_frames):
        slots.setdefault(index, []).append(slot)
    try:
        for index, raw in _stored_frames(item, header, wanted):
            frame = _frame_values(item, header, index, raw, info)
            for slot in slots[index]:
                values[slot] = frame
    except MedicalImageError:
        raise
    except Exception as err:  # decoders raise many types: missing plugin, truncated data, bad stream
        tsuid = header.file_meta.get("TransferSyntaxUID", "?")
        raise MedicalImageError(
            f"{item.name}: cannot decode the pixel data ({tsuid}): {err}. Fix: check the file is "
            "complete; compressed syntaxes need pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg",
            "unreadable_image",
        ) from err
    return values


def _stored_frames(item: SliceFile, header: Any, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, stored pixels)`` of the wanted frames: native data read frame by frame from the file;
    compressed frames decoded one at a time, each once its codestream's size is checked."""
    from pydicom.pixels import iter_pixels, pixel_array

    if not header.file_meta.TransferSyntaxUID.is_compressed:
        with item.opener() as handle:
            yield from zip(wanted, iter_pixels(handle, indices=wanted), strict=True)
        return
    frames = int(header.get("NumberOfFrames", 1) or 1)
    stored = int(header.get("SamplesPerPixel", 1) or 1) * -(-int(header.get("BitsAllocated", 8)) // 8)
    ds = read_dataset_with_pixels(item, int(header.Rows) * int(header.Columns) * frames * stored)
    for index in wanted:
        check_encoded_frame(item, ds, index)
        yield index, pixel_array(ds, index=index if frames > 1 else None)


def _frame_values(item: SliceFile, header: Any, index: int, raw: np.ndarray, info: VolumeHeader) -> np.ndarray:
    expected = (info.height, info.width)
    if raw.shape[:2] != expected:
        raise MedicalImageError(
            f"{item.name}: frame {index + 1} decoded to shape {tuple(raw.shape)}, not Rows x Columns "
            f"{expected[0]}x{expected[1]}",
            "unreadable_image",
        )
    if info.samples == 3:
        return colour_frame(raw, header)
    return _modality_values(Path(item.name), header, index, raw)
