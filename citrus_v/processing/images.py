"""Image and mask inputs: loading to RGB, the SAM 2 input, and the low-resolution mask targets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageInput = str | Path | Image.Image | np.ndarray
MaskInput = str | Path | dict | Image.Image | np.ndarray | torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8 by its own min/max (a full-range window)."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.clip((array - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def load_image(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image: a path, a PIL image, or an ``[H, W]``/``[H, W, C]`` array.

    Paths (PNG/JPEG/TIFF, DICOM, NIfTI with ``#slice=...``) are read by :mod:`citrus_v.data.medical_io`.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        from ..data.medical_io import MedicalImageError, read_image

        try:
            return read_image(image)
        except MedicalImageError as err:
            if err.reason == "missing_file":
                raise FileNotFoundError(str(err)) from err
            raise
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            return Image.fromarray(_array_to_uint8(image)).convert("RGB")
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            return Image.fromarray(_array_to_uint8(image)[..., :3]).convert("RGB")
        raise ValueError(f"image array must be [H, W] or [H, W, 3]; got shape {image.shape}")
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, PIL image or numpy array")


def sam_pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """SAM 2 input ``[3, size, size]``: direct LANCZOS resize (aspect ignored), /255, ImageNet mean/std."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array - mean) / std


def load_mask(mask: MaskInput) -> np.ndarray:
    """Return a mask as a boolean ``[H, W]`` array (non-zero is foreground)."""
    if isinstance(mask, (str, Path, dict)):
        from ..data.medical_io import MedicalImageError, read_mask

        try:
            array = read_mask(mask)
        except MedicalImageError as err:
            if err.reason == "missing_file":
                raise FileNotFoundError(f"mask {err}") from err
            raise
    elif isinstance(mask, Image.Image):
        array = np.asarray(mask)
    elif isinstance(mask, torch.Tensor):
        array = mask.detach().cpu().numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
    else:
        raise TypeError(
            f"unsupported mask type {type(mask).__name__}: pass a path, RLE/polygon dict, PIL image or array"
        )
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"a mask must be 2-D; got shape {array.shape}")
    return array > 0


def mask_target(mask: MaskInput, size: tuple[int, int]) -> torch.Tensor:
    """Mask target ``[h, w]`` float in {0, 1}: nearest resize to the SAM low-res size, binarised ``> 0``."""
    binary = load_mask(mask)
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 0).float()


IGNORE_TARGET = -1.0  # lesion-map target of tokens whose image has no map


def text_map_target(labels: np.ndarray, cells: tuple[int, int], merge: int) -> torch.Tensor:
    """Text-map target ``[rows * cols, merge * merge]`` in merged-token order: the character class at the
    centre of each patch (patches row-major within their merged token, as Qwen2.5-VL's merger reads them).

    ``labels`` is the ``[H, W]`` label image of the original picture (:mod:`citrus_v.modeling.text_map`);
    ``cells`` the merged-token grid ``(rows, cols)``.
    """
    rows, cols = cells
    height, width = labels.shape
    ys = ((np.arange(rows * merge) + 0.5) * height / (rows * merge)).astype(int)
    xs = ((np.arange(cols * merge) + 0.5) * width / (cols * merge)).astype(int)
    grid = labels[ys][:, xs].astype(np.int64)  # [rows*merge, cols*merge]
    blocks = grid.reshape(rows, merge, cols, merge).transpose(0, 2, 1, 3).reshape(rows * cols, merge * merge)
    return torch.from_numpy(np.ascontiguousarray(blocks))


def lesion_map_target(mask: MaskInput, cells: tuple[int, int]) -> torch.Tensor:
    """Lesion-map target ``[rows * cols]`` in merged-token order: 1.0 where a cell holds any lesion pixel.

    ``cells`` is the merged-token grid ``(rows, cols)`` of the image (``grid_h / merge``, ``grid_w / merge``);
    the mask is averaged over each cell (box filter), so a partly covered cell counts as lesion.
    """
    binary = load_mask(mask).astype(np.float32)
    rows, cols = cells
    coverage = np.asarray(Image.fromarray(binary).resize((cols, rows), Image.Resampling.BOX))
    return torch.from_numpy((coverage > 0).reshape(-1)).float()


def lesion_count_target(
    points: Sequence[Sequence[float]], size: tuple[int, int], cells: tuple[int, int]
) -> torch.Tensor:
    """Lesion-count target ``[rows * cols]`` in merged-token order: how many of ``points`` (each lesion's
    centre, ``(x, y)`` pixels of an image of ``size`` ``(width, height)``) fall in each cell."""
    rows, cols = cells
    width, height = size
    target = torch.zeros(rows * cols)
    for x, y in points:
        row = min(max(int(y * rows / height), 0), rows - 1)
        col = min(max(int(x * cols / width), 0), cols - 1)
        target[row * cols + col] += 1
    return target

