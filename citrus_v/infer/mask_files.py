"""Mask files in the source's own format: PNG for any image, NIfTI on the source volume's grid, and one DICOM
Segmentation referencing the source frame.

numpy and Pillow only at import; nibabel, pydicom and highdicom load on first use, and torch never does, so
that the web app's downloads use the same writers as ``citrus-v infer``. A mask is a ``[H, W]`` array of the
image's own pixels (as :class:`~citrus_v.infer.results.MaskResult` holds it); nonzero is inside.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .segment_codes import segment_code

# Type 2 attributes of the patient and study modules that a Segmentation copies from its source
_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)

# What highdicom is shown in place of a source whose geometry it cannot follow (see _pixel_reference_view):
# a single-frame class with an optional Frame of Reference; the written references name the source's own class
_STAND_IN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage

# what that view leaves out: the frame of reference, the frame's place in it, and the frames and their groups
_GEOMETRY_KEYWORDS = (
    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient", "ImageOrientationPatient",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames",
)


def write_png_masks(masks: Sequence[np.ndarray], out_dir: Path, stem: str = "mask") -> list[Path]:
    """``out_dir/{stem}_K.png`` for each mask, K counted from 1 as the overlay and the legend number them: 8-bit,
    255 inside and 0 outside, the image's own size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, mask in enumerate(masks):
        path = out_dir / f"{stem}_{k + 1}.png"
        Image.fromarray(_binary(mask, k).astype(np.uint8) * 255).save(path)
        paths.append(path)
    return paths


def write_nifti_masks(
    source_path: Path, masks: Sequence[np.ndarray], slice_index: int, axis: int, out_dir: Path
) -> list[Path]:
    """``out_dir/mask_K.nii.gz`` for each mask: a uint8 volume on the source's voxel grid, 1 inside the mask in
    slice ``slice_index`` along RAS+ ``axis`` (the slice ``citrus-v infer`` showed the model) and 0 elsewhere,
    with the source's affine, its qform and sform codes and its units."""
    import nibabel as nib

    from ..media import read_nifti

    volume = read_nifti(source_path)
    count = volume.num_slices(axis)
    if not 0 <= int(slice_index) < count:
        raise ValueError(f"{source_path}: slice {slice_index} is outside 0..{count - 1} along axis {axis}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, mask in enumerate(masks):
        data = volume.volume_from_slices({int(slice_index): _binary(mask, k).astype(np.uint8)}, axis)
        path = out_dir / f"mask_{k + 1}.nii.gz"
        nib.save(nifti_like(data.astype(np.uint8), volume.affine, volume.header), path)
        paths.append(path)
    return paths


def nifti_like(data: np.ndarray, affine: np.ndarray, source_header: Any) -> Any:
    """A NIfTI-1 image of ``data`` placed as the source is: its qform and sform with their codes (a code of 0
    stays 0, so a reader falls back exactly as it does for the source), and its spatial and time units."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    if hasattr(source_header, "get_qform"):  # NIfTI-1 and NIfTI-2 headers
        qform, qcode = source_header.get_qform(coded=True)
        sform, scode = source_header.get_sform(coded=True)
        image.set_qform(affine if qform is None else qform, code=int(qcode))
        image.set_sform(affine if sform is None else sform, code=int(scode))
        image.header.set_xyzt_units(*source_header.get_xyzt_units())
    return image


def write_dicom_seg(
    source_path: Path,
    masks: Sequence[np.ndarray],
    labels: Sequence[str | None],
    out_path: Path,
    frame: int | None = None,
) -> Path:
    """One DICOM Segmentation (highdicom, binary) at ``out_path``: a segment per mask, each coded from its label
    (:func:`~citrus_v.infer.segment_codes.segment_code`), on frame ``frame`` (0-based, default 0) of the source,
    which it references.

    A source whose geometry highdicom can follow (a Frame of Reference with usable positions, orientation and
    pixel spacing) gets a Segmentation in that frame of reference. Any other source — secondary captures,
    RGB, pixel spacing ``0\\0``, legacy multi-frame files without functional groups, retired SOP classes — gets
    one aligned pixel for pixel with the referenced frame, with no frame of reference. Raises ``ValueError``
    naming the reason where no valid Segmentation can exist (no SOP Instance, Study or Series UID to reference,
    a frame the file does not have, a mask of another size).
    """
    import highdicom as hd
    import pydicom

    version = software_version()
    source_path = Path(source_path)
    dataset = pydicom.dcmread(source_path, stop_before_pixels=True)  # the header is all a reference needs
    index = _check_seg_inputs(source_path, dataset, masks, labels, frame)
    original = {"class": str(dataset.SOPClassUID), "instance": str(dataset.SOPInstanceUID)}
    multiframe = "NumberOfFrames" in dataset
    fill_patient_and_study(dataset)
    stack = np.stack([_binary(m, k) for k, m in enumerate(masks)], axis=-1)[np.newaxis]  # [1, rows, cols, K]
    spatial = _spatial_arguments(dataset, index)
    view = dataset if spatial is not None else _pixel_reference_view(dataset)
    segmentation = hd.seg.Segmentation(
        source_images=[view],
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(labels, version),
        series_instance_uid=hd.UID(),
        series_number=series_number(dataset),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Citrus-V",
        manufacturer_model_name="citrus-v",
        software_versions=version,
        device_serial_number="0",
        content_label="CITRUS_V",
        content_description="Citrus-V [SEG] masks",
        omit_empty_frames=False,  # an empty mask is written as an empty frame: "nothing here", not "not asked"
        **(spatial or {}),
    )
    if view is not dataset:
        _restore_references(segmentation, original, index + 1 if multiframe else None)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(out_path)
    return out_path


SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def check_referenceable(name: str, dataset: Any) -> None:
    """A source instance a Segmentation can reference: it names its instance, study and series."""
    missing = [k for k in SOURCE_UIDS if k not in dataset]
    if missing:
        raise ValueError(
            f"{name} has no {', '.join(missing)}: a Segmentation must name the instance, study and series it "
            "segments; give the file those UIDs first"
        )


def check_masks_and_labels(masks: Sequence[Any], labels: Sequence[str | None]) -> None:
    """At least one mask, and one label (or None) per mask."""
    if not masks:
        raise ValueError("a DICOM Segmentation needs at least one mask")
    if len(labels) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels: give one label (or None) per mask")


def _check_seg_inputs(
    path: Path, dataset: Any, masks: Sequence[np.ndarray], labels: Sequence[str | None], frame: int | None
) -> int:
    """The 0-based frame index, once the source can be referenced and every mask fits its frame."""
    check_referenceable(str(path), dataset)
    check_masks_and_labels(masks, labels)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    index = 0 if frame is None else int(frame)
    if not 0 <= index < frames:
        raise ValueError(f"{path}: frame {index} does not exist; the file has {frames} frame(s) (0..{frames - 1})")
    size = (int(dataset.Rows), int(dataset.Columns))
    for k, mask in enumerate(masks):
        if np.shape(mask) != size:
            raise ValueError(f"mask {k} is {np.shape(mask)} but {path.name} has {size[0]} rows x {size[1]} columns")
    return index


def fill_patient_and_study(dataset: Any) -> None:
    """Type 2 patient and study attributes the source lacks become empty, and dates and times in the old
    ``HH:MM:SS`` / ``YYYY-MM-DD`` forms are rewritten as DICOM's ``HHMMSS`` / ``YYYYMMDD`` (left empty when
    even that fails) — on the copy read for writing, never in the source file."""
    from pydicom.valuerep import DA, TM

    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    for keyword, kind, separators in (
        ("StudyDate", DA, "-:/"), ("PatientBirthDate", DA, "-:/"), ("StudyTime", TM, ":"),
    ):
        value = str(dataset.get(keyword) or "")
        for candidate in (value, value.translate({ord(c): None for c in separators})):
            try:
                kind(candidate)
            except ValueError:
                continue
            setattr(dataset, keyword, candidate)
            break
        else:
            setattr(dataset, keyword, "")


def _spatial_arguments(dataset: Any, index: int) -> dict[str, Any] | None:
    """highdicom's arguments to place the Segmentation in the source's frame of reference, or ``None`` when it
    cannot: a class highdicom knows, a position, orientation, positive pixel spacing and slice thickness — per
    frame, and distinct, for a multi-frame image, whose chosen frame is then named by its plane position."""
    from highdicom.spatial import CoordinateSystemNames, get_image_coordinate_system
    from highdicom.utils import get_plane_positions_of_image, is_multiframe_image

    try:
        if get_image_coordinate_system(dataset) != CoordinateSystemNames.PATIENT:
            return None
        if not is_multiframe_image(dataset):
            usable = (
                _numbers(dataset.get("ImagePositionPatient"), 3)
                and _orientation(dataset.get("ImageOrientationPatient"))
                and _positive(dataset.get("PixelSpacing"), 2)
                and _positive(dataset.get("SliceThickness"), 1)
            )
            return {} if usable else None
        if not enhanced_geometry(dataset, index):
            return None
        return {"plane_positions": [get_plane_positions_of_image(dataset)[index]]}
    except (KeyError, AttributeError, TypeError, ValueError):  # a class highdicom does not know, broken values
        return None


def enhanced_geometry(dataset: Any, index: int) -> bool:
    """Shared orientation and pixel measures, and one distinct position per frame (enhanced multi-frame)."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if not shared or per_frame is None or len(per_frame) != frames:
        return False
    measures, orientation = shared[0].get("PixelMeasuresSequence"), shared[0].get("PlaneOrientationSequence")
    if not measures or not orientation:
        return False
    if not _positive(measures[0].get("PixelSpacing"), 2):
        return False
    if not _orientation(orientation[0].get("ImageOrientationPatient")):
        return False
    positions = []
    for item in per_frame:
        plane = item.get("PlanePositionSequence")
        if not plane or not _numbers(plane[0].get("ImagePositionPatient"), 3):
            return False
        positions.append([float(v) for v in plane[0].ImagePositionPatient])
    distances = np.linalg.norm(np.asarray(positions) - np.asarray(positions[index]), axis=1)
    return int((distances < 1e-3).sum()) == 1  # the chosen frame's position names it alone


def _pixel_reference_view(dataset: Any) -> Any:
    """What highdicom is shown for a source whose geometry it cannot follow: the same study, series, instance
    and frame size, as one single frame of a class it knows, without frame of reference. Pixel measures are
    kept only when the source gives a positive pixel spacing and slice thickness: highdicom reads a Pixel
    Measures item back only with both, and a spacing of ``0\\0`` means unknown. The Segmentation is then
    aligned pixel for pixel with the frame it references."""
    view = copy.deepcopy(dataset)
    for keyword in _GEOMETRY_KEYWORDS:
        if keyword in view:
            delattr(view, keyword)
    measures = _positive(view.get("PixelSpacing"), 2) and _positive(view.get("SliceThickness"), 1)
    unusable = ["PixelSpacing", "SliceThickness"] if not measures else []
    if not (measures and _positive(view.get("SpacingBetweenSlices"), 1)):
        unusable.append("SpacingBetweenSlices")
    for keyword in unusable:
        if keyword in view:
            delattr(view, keyword)
    view.SOPClassUID = _STAND_IN_SOP_CLASS
    return view


def _restore_references(segmentation: Any, original: dict[str, str], frame_number: int | None) -> None:
    """Every reference to the source names its own SOP class again, and each frame's derivation reference to a
    multi-frame source names the frame (1-based), as highdicom writes it for sources it can follow."""
    from pydicom.dataset import Dataset

    def visit(item: Dataset, path: tuple[str, ...]) -> None:
        if item.get("ReferencedSOPInstanceUID") == original["instance"]:
            item.ReferencedSOPClassUID = original["class"]
            if frame_number is not None and path[-2:] == ("DerivationImageSequence", "SourceImageSequence"):
                item.ReferencedFrameNumber = frame_number
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    visit(child, (*path, element.keyword))

    visit(segmentation, ())


def segment_descriptions(labels: Sequence[str | None], version: str) -> list[Any]:
    """One binary segment per mask, numbered from 1, labelled and coded from its words."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="Citrus-V", version=version, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = []
    for k, label in enumerate(labels):
        code = segment_code(label)
        description = hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=((label or "").strip() or f"mask {k + 1}")[:64],
            segmented_property_category=code.category,
            segmented_property_type=code.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=None if code.region is None else [code.region],
        )
        if code.type_modifier is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(code.type_modifier)]
        if code.region_modifier is not None:
            region = description.AnatomicRegionSequence[0]
            region.AnatomicRegionModifierSequence = [hd.sr.CodedConcept.from_code(code.region_modifier)]
        descriptions.append(description)
    return descriptions


def series_number(dataset: Any) -> int:
    """The source's series number + 1000 (within the IS range), so the Segmentation sorts after its source."""
    try:
        number = int(dataset.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return min(max(number, 0) + 1000, 2**31 - 1)


def software_version() -> str:
    """The installed citrus-v's version (read from its metadata: importing the top package would reach the
    model's stack, which the web app must not load)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("citrus-v")
    except PackageNotFoundError:
        return "unknown"


def _binary(mask: np.ndarray, index: int) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask {index} has shape {array.shape}; a mask is one [H, W] array")
    return array != 0


def _floats(value: Any, count: int) -> list[float] | None:
    """``value`` (a DICOM number or multi-value) as ``count`` finite floats, else ``None``."""
    if value is None:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def _numbers(value: Any, count: int) -> bool:
    return _floats(value, count) is not None


def _positive(value: Any, count: int) -> bool:
    numbers = _floats(value, count)
    return numbers is not None and all(v > 0 for v in numbers)


def _orientation(value: Any) -> bool:
    """Six finite direction cosines: two unit vectors at right angles."""
    numbers = _floats(value, 6)
    if numbers is None:
        return False
    row, col = np.asarray(numbers[:3]), np.asarray(numbers[3:])
    unit = abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
    return bool(unit and abs(float(row @ col)) < 1e-3)
