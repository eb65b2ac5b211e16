"""Image and mask inputs: loading to RGB, the SAM 2 input, and the low-resolution mask targets."""

from __future__ import annotations

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

    Paths (PNG/JPEG/TIFF, DICOM, NIfTI with ``#slice=...``) are read by :mod:`citrus_v.media`.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        from ..media import MedicalImageError, read_image

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


def smart_resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at the smart-resized ``(width, height)`` the vision tower sees, resized as upstream's
    ``qwen_vl_utils.fetch_image`` does (PIL's bicubic); the same image when it already has that size."""
    image = image.convert("RGB")
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.BICUBIC)


def mask_to_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean low-res ``[h, w]`` mask at ``(width, height)``: PIL's nearest-neighbour resize, as upstream's
    clients draw its masks (and as :func:`mask_target` makes the targets)."""
    resized = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def load_mask(mask: MaskInput) -> np.ndarray:
    """Return a mask as a boolean ``[H, W]`` array (non-zero is foreground)."""
    if isinstance(mask, (str, Path, dict)):
        from ..media import MedicalImageError, read_mask

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

