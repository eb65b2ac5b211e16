"""Ground truth of a sample read from disk: images, image sizes, pixel spacing, masks; and their checks.

Images and masks go through :mod:`citrus_v.media` (PNG, DICOM, NIfTI slices, COCO RLE). A mask
that is not the size of its image, or a box outside its image, is an :class:`EvalDataError` naming the
sample, so that a wrong ground truth never becomes a silently wrong score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..media import MediaRef, MedicalImageError, image_size, parse_ref, read_image, read_mask
from .samples import EvalDataError, EvalSample


def media_ref(sample: EvalSample, ref: Any) -> MediaRef | dict:
    """An image or mask reference of ``sample`` resolved against its base folder (inline masks unchanged)."""
    if isinstance(ref, dict) and ("counts" in ref or "polygons" in ref):
        return ref
    try:
        return parse_ref(ref, sample.base_dir)
    except MedicalImageError as err:
        raise EvalDataError(f"{sample.where()}: {err}") from None


def load_images(sample: EvalSample) -> list[Image.Image]:
    """The sample's images as RGB PIL images (what both backends are given)."""
    try:
        return [read_image(media_ref(sample, ref)) for ref in sample.images]
    except MedicalImageError as err:
        raise EvalDataError(f"{sample.where()}: {err}") from None


def first_image_size(sample: EvalSample) -> tuple[int, int]:
    """``(width, height)`` of the sample's first image, from its header."""
    if not sample.images:
        raise EvalDataError(f"{sample.where()}: the sample has no image")
    try:
        return image_size(media_ref(sample, sample.images[0]))
    except MedicalImageError as err:
        raise EvalDataError(f"{sample.where()}: {err}") from None


def reference_masks(sample: EvalSample, size: tuple[int, int]) -> list[np.ndarray]:
    """The ground-truth masks of a seg sample, each checked to be ``size`` = ``(width, height)``."""
    width, height = size
    masks = []
    for k, ref in enumerate(sample.reference or []):
        try:
            mask = read_mask(media_ref(sample, ref), size=size)
        except MedicalImageError as err:
            raise EvalDataError(f"{sample.where()}: mask {k}: {err}") from None
        if mask.shape != (height, width):
            raise EvalDataError(
                f"{sample.where()}: ground-truth mask {k} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                f"{width}x{height}; a mask must have its image's size"
            )
        masks.append(mask)
    return masks


def check_boxes(sample: EvalSample, size: tuple[int, int]) -> None:
    """Ground-truth boxes must have x1 <= x2, y1 <= y2 and lie inside the ``(width, height)`` image."""
    width, height = size
    for k, box in enumerate(sample.reference or []):
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise EvalDataError(
                f"{sample.where()}: ground-truth box {k} [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the "
                f"{width}x{height} image (or has x1 > x2 / y1 > y2); boxes are [x1, y1, x2, y2] in original pixels"
            )


def check_sample(sample: EvalSample) -> None:
    """Check what can be checked before the model runs: images readable, masks' sizes, boxes inside."""
    if sample.task in ("seg", "det"):
        size = first_image_size(sample)
        if sample.task == "seg":
            reference_masks(sample, size)
        else:
            check_boxes(sample, size)
    else:
        for ref in sample.images:
            parsed = media_ref(sample, ref)
            if isinstance(parsed, MediaRef) and not parsed.path.is_file():
                raise EvalDataError(f"{sample.where()}: image file not found: {parsed.path}")


def pixel_spacing(sample: EvalSample) -> tuple[float, float] | None:
    """Millimetres per pixel ``(row, col)`` of the first image: the row's own, DICOM PixelSpacing, or NIfTI zooms."""
    if sample.spacing is not None:
        return sample.spacing
    if not sample.images:
        return None
    ref = media_ref(sample, sample.images[0])
    if not isinstance(ref, MediaRef):
        return None
    try:
        if ref.kind == "dicom":
            return _dicom_spacing(ref.path)
        if ref.kind == "nifti":
            return _nifti_spacing(ref.path, 2 if ref.axis is None else ref.axis)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _dicom_spacing(path: Path) -> tuple[float, float] | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if value is None or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


def _nifti_spacing(path: Path, axis: int) -> tuple[float, float]:
    import nibabel as nib
    from nibabel.orientations import io_orientation

    image = nib.load(path)
    zooms = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    canonical = [0.0, 0.0, 0.0]
    for source, (target, _flip) in enumerate(io_orientation(image.affine)):
        canonical[int(target)] = float(zooms[source])
    rest = [canonical[k] for k in range(3) if k != axis]
    # citrus_v.media's display plane is the transposed RAS+ plane: rows follow the second remaining axis
    return rest[1], rest[0]
