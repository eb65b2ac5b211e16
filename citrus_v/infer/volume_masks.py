"""3-D mask files on the source's own grid: NIfTI for any volume or clip, one DICOM Segmentation for a DICOM
series or multi-frame file.

A mask stack is ``[N, H, W]`` over a :class:`~citrus_v.media.volume.Volume` (frame ``k`` a mask of
``volume.values[k]``, in the same display orientation); nonzero is inside. Several targets come as a list of
stacks (or a ``[K, N, H, W]`` array), or as one label stack whose value ``k`` marks target ``k``
(:func:`mask_stacks`).

- NIfTI of a NIfTI source: the source's shape, affine, qform/sform codes and units (the slices go back through
  ``volume.nifti.volume_from_slices`` along ``volume.axis``). NIfTI of a DICOM source: voxels indexed
  ``(column, row, frame)``, affine the volume's LPS affine turned to RAS. A source without an affine (a video):
  the voxel sizes from its spacing when known, and orientation codes 0 ("unknown"), which is the truth. A
  volume that holds a sample of its source's frames (``volume.source_frames``) puts each frame back on its
  source slice (the others stay 0), or, for DICOM, gets the affine of the sample when it is evenly spaced.
- DICOM-SEG (highdicom, binary): source images the series' headers (or the one multi-frame file), one frame
  per source frame that holds mask, each frame referencing its SOP Instance (and, for a multi-frame source,
  its frame number); frames without mask are left out, as highdicom does by default and readers expect. A
  multi-frame source without a frame of reference (an ultrasound cine loop), which highdicom can segment one
  frame at a time only, gets one Segmentation per frame with mask.

numpy at import; nibabel, pydicom and highdicom on first use; no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..media.volume import Volume
from .mask_files import (
    check_masks_and_labels,
    check_referenceable,
    enhanced_geometry,
    fill_patient_and_study,
    nifti_like,
    segment_descriptions,
    series_number,
    software_version,
    write_dicom_seg,
)

# DICOM patient coordinates (LPS) to NIfTI's (RAS): the first two axes change sign
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEG_SUFFIX = ".seg.dcm"

MaskInput = np.ndarray | Sequence[np.ndarray]


def mask_stacks(masks: MaskInput, shape: tuple[int, ...]) -> list[np.ndarray]:
    """One boolean ``[N, H, W]`` stack per target, each checked against the volume's ``shape`` (``(N, H, W)``).

    ``masks`` is a list of stacks, a ``[K, N, H, W]`` array, or one ``[N, H, W]`` stack: binary (one target)
    or a label stack (value ``k`` = target ``k``, from 1; a label absent from the stack is an empty target).
    """
    shape = tuple(int(s) for s in shape[:3])
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        stacks = _split_labels(masks)
    else:
        stacks = [np.asarray(m) for m in masks]
    for k, stack in enumerate(stacks):
        if stack.shape != shape:
            raise ValueError(
                f"mask {k + 1} is {stack.shape} but the volume is {shape} (frames, rows, columns): give one "
                "[N, H, W] stack per target, frames in the volume's display orientation"
            )
    return [stack != 0 for stack in stacks]


def _split_labels(stack: np.ndarray) -> list[np.ndarray]:
    """A binary stack as one target; a label stack as one target per label value ``1..max``."""
    if stack.dtype == bool:
        return [stack]
    if not np.issubdtype(stack.dtype, np.integer):
        raise ValueError(f"a label stack must hold integers or booleans, not {stack.dtype}: threshold it first")
    top = int(stack.max(initial=0))
    if int(stack.min(initial=0)) < 0:
        raise ValueError("a label stack holds a negative value: labels are 0 (outside) and 1..K (target k)")
    if top <= 1:
        return [stack]
    return [stack == value for value in range(1, top + 1)]


def ras_affine(volume: Volume) -> np.ndarray | None:
    """The volume's ``(column, row, frame)`` -> RAS affine in mm: a NIfTI source's as it is, a DICOM source's
    (LPS) with the first two axes negated; ``None`` when the volume has no affine (a video)."""
    if volume.affine is None:
        return None
    affine = np.asarray(volume.affine, dtype=np.float64)
    return affine if volume.nifti is not None else LPS_TO_RAS @ affine


def source_frames(volume: Volume) -> list[int]:
    """The source frame (0-based) each of the volume's frames is: ``volume.source_frames`` when only some
    frames were decoded, else ``0..N-1``."""
    if volume.source_frames is None:
        return list(range(volume.num_frames))
    frames = [int(k) for k in volume.source_frames]
    if len(frames) != volume.num_frames:
        raise ValueError(f"{volume.source}: {volume.num_frames} frames but {len(frames)} source frame numbers")
    return frames


def frame_step(frames: Sequence[int]) -> int | None:
    """The constant step between ``frames`` (1 for a single frame), ``None`` when the steps differ."""
    steps = set(np.diff(np.asarray(frames, dtype=np.int64)).tolist())
    if not steps:
        return 1
    return int(steps.pop()) if len(steps) == 1 and min(steps) > 0 else None


def write_volume_nifti(volume: Volume, masks: MaskInput, out_dir: Path, stem: str = "mask") -> list[Path]:
    """``out_dir/{stem}_K.nii.gz`` for each target (K from 1): uint8, 1 inside, on the source's grid (see the
    module's note for NIfTI, DICOM and clip sources)."""
    stacks = mask_stacks(masks, volume.values.shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, stack in enumerate(stacks):
        image = _nifti_image(volume, stack.astype(np.uint8))
        path = out_dir / f"{stem}_{k + 1}.nii.gz"
        image.to_filename(str(path))
        paths.append(path)
    return paths


def _nifti_image(volume: Volume, stack: np.ndarray) -> Any:
    """A NIfTI-1 image of one ``[N, H, W]`` uint8 stack, placed as the module's note says."""
    import nibabel as nib

    source = volume.nifti
    if source is not None:  # every slice of the source's grid; those not decoded stay 0
        slices = dict(zip(source_frames(volume), stack, strict=True))
        data = source.volume_from_slices(slices, axis=volume.axis).astype(np.uint8)
        return nifti_like(data, source.affine, source.header)
    data = np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))  # voxel (column, row, frame)
    affine = _sampled_affine(volume)
    image = nib.Nifti1Image(data, affine)
    if affine is None:
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
        if volume.spacing is not None:
            image.header.set_zooms(tuple(float(s) for s in reversed(volume.spacing)))
    else:
        image.set_qform(affine, code=1)  # scanner coordinates, as the DICOM positions are
        image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _sampled_affine(volume: Volume) -> np.ndarray | None:
    """The RAS affine of the frames the volume holds: with a sample of a series' slices, frame ``k`` sits at
    source slice ``source_frames[k]``, which one affine can say only for evenly spaced samples."""
    affine = ras_affine(volume)
    if affine is None or volume.source_frames is None:
        return affine
    frames = source_frames(volume)
    step = frame_step(frames)
    if step is None:
        raise ValueError(
            f"{volume.source}: the frames are a sample of the source's slices at uneven steps ({frames[:6]}...), "
            "so no one affine places them. Fix: read the volume without frame sampling to write its masks"
        )
    sampled = affine.copy()
    sampled[:3, 3] = affine[:3, 3] + frames[0] * affine[:3, 2]
    sampled[:3, 2] = step * affine[:3, 2]
    return sampled


def write_volume_seg(
    volume: Volume, masks: MaskInput, labels: Sequence[str | None] | None, out_path: Path
) -> list[Path]:
    """The DICOM Segmentation(s) of the masks (a segment per target, coded from its label) at ``out_path``, or,
    for a multi-frame source without a frame of reference, ``{name}_frame{k}.seg.dcm`` beside it for each
    frame ``k`` with mask (0-based, in the volume's frame order; the source index of a sampled frame).

    Raises ``ValueError`` naming the reason where no Segmentation can exist (not a DICOM source, an instance
    without the UIDs a reference needs, masks of another size)."""
    stacks = mask_stacks(masks, volume.values.shape)
    labels = [None] * len(stacks) if labels is None else list(labels)
    _check_seg_source(volume, stacks, labels)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if len(volume.datasets) == 1 and _is_multiframe(volume.datasets[0]):
        if not _patient_geometry(volume.datasets[0]):
            return _per_frame_segs(volume, stacks, labels, out_path)
        pixels = _multiframe_pixels(volume, stacks)
    else:
        pixels = np.stack(stacks, axis=-1).astype(np.uint8)  # [N, H, W, K], frame k on dataset k
    sources = [_prepared_source(ds, volume) for ds in volume.datasets]
    _segmentation(sources, pixels, labels).save_as(out_path)
    return [out_path]


def _check_seg_source(volume: Volume, stacks: list[np.ndarray], labels: list[str | None]) -> None:
    """A DICOM source whose instances can be referenced, one per frame (or one multi-frame file)."""
    if not volume.datasets:
        raise ValueError(
            f"{volume.source}: not a DICOM source, so there is no instance for a DICOM Segmentation to reference; "
            "the NIfTI masks stand"
        )
    check_masks_and_labels(stacks, labels)
    for ds in volume.datasets:
        check_referenceable(_name(ds, volume), ds)
    multiframe = len(volume.datasets) == 1 and _is_multiframe(volume.datasets[0])
    if not multiframe and len(volume.datasets) != volume.num_frames:
        raise ValueError(
            f"{volume.source}: {volume.num_frames} frames but {len(volume.datasets)} DICOM headers; a series "
            "needs the header of every slice, in frame order"
        )


def _name(ds: Any, volume: Volume) -> str:
    return str(getattr(ds, "filename", None) or volume.source)


def _is_multiframe(ds: Any) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def _patient_geometry(ds: Any) -> bool:
    """Whether highdicom can place every frame of a multi-frame file in its frame of reference: a patient
    coordinate system, shared orientation and pixel measures, and one distinct position per frame."""
    from highdicom.spatial import CoordinateSystemNames, get_image_coordinate_system

    try:
        if get_image_coordinate_system(ds) != CoordinateSystemNames.PATIENT:
            return False
        frames = int(ds.NumberOfFrames)
        return all(enhanced_geometry(ds, k) for k in range(frames))
    except (KeyError, AttributeError, TypeError, ValueError):  # a class highdicom does not know, broken values
        return False


def _frame_numbers(volume: Volume) -> list[int]:
    """The source frame number (1-based) of each volume frame: the references', else ``1..N``."""
    numbers = [ref.frame_number for ref in volume.references]
    if len(numbers) == volume.num_frames and all(n is not None for n in numbers):
        return [int(n) for n in numbers]
    return list(range(1, volume.num_frames + 1))


def _multiframe_pixels(volume: Volume, stacks: list[np.ndarray]) -> np.ndarray:
    """``[F, H, W, K]`` for all ``F`` frames of the multi-frame file, each volume frame at its frame number
    (a volume that holds a subset of the frames leaves the others empty, and they are left out)."""
    total = int(volume.datasets[0].NumberOfFrames)
    pixels = np.zeros((total, *volume.frame_shape, len(stacks)), dtype=np.uint8)
    for k, number in enumerate(_frame_numbers(volume)):
        if not 1 <= number <= total:
            raise ValueError(f"{volume.source}: frame number {number} is outside 1..{total}")
        pixels[number - 1] = np.stack([stack[k] for stack in stacks], axis=-1)
    return pixels


def _prepared_source(ds: Any, volume: Volume) -> Any:
    """A copy of a source header as highdicom needs it: empty Type 2 patient/study attributes where missing,
    dates in DICOM form, and a slice thickness (the volume's slice distance) where a slice states none."""
    ds = copy.deepcopy(ds)
    fill_patient_and_study(ds)
    if not _is_multiframe(ds) and "SliceThickness" not in ds and volume.spacing is not None:
        ds.SliceThickness = f"{float(volume.spacing[0]):.6g}"
    return ds


def _segmentation(sources: list[Any], pixels: np.ndarray, labels: list[str | None]) -> Any:
    """highdicom's binary Segmentation of ``pixels`` (``[frames, H, W, K]``) over ``sources``."""
    import highdicom as hd

    version = software_version()
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(labels, version),
        series_instance_uid=hd.UID(),
        series_number=series_number(sources[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Citrus-V",
        manufacturer_model_name="citrus-v",
        software_versions=version,
        device_serial_number="0",
        content_label="CITRUS_V",
        content_description="Citrus-V [SEG] masks",
        omit_empty_frames=True,  # highdicom's convention: only frames that hold mask are written
    )


def _per_frame_segs(volume: Volume, stacks: list[np.ndarray], labels: list[str | None], out_path: Path) -> list[Path]:
    """One single-frame Segmentation per volume frame with mask (2-D writer, referencing that frame)."""
    source = _source_path(volume)
    name = out_path.name[: -len(_SEG_SUFFIX)] if out_path.name.endswith(_SEG_SUFFIX) else out_path.stem
    numbers, indices = _frame_numbers(volume), source_frames(volume)
    paths = []
    for k in range(volume.num_frames):
        frame_masks = [stack[k] for stack in stacks]
        if not any(mask.any() for mask in frame_masks):
            continue
        path = out_path.with_name(f"{name}_frame{indices[k]}{_SEG_SUFFIX}")
        paths.append(write_dicom_seg(source, frame_masks, labels, path, frame=numbers[k] - 1))
    return paths


def _source_path(volume: Volume) -> Path:
    """The file of a multi-frame source (its reference's path, else the volume's source), which the 2-D
    writer reads again."""
    paths = {ref.path for ref in volume.references if ref.path}
    path = Path(paths.pop() if len(paths) == 1 else volume.source)
    if not path.is_file():
        raise ValueError(
            f"{volume.source}: a multi-frame file without a frame of reference is segmented one frame at a time "
            f"from its file, and {path} is not a file on disk (it came as bytes); the NIfTI masks stand"
        )
    return path
