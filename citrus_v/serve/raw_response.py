"""Upstream Citrus-V's top-level ``raw_response`` object, made from the same prediction as ``grounding``.

Upstream's server sends the 256×256 low-resolution masks and its clients resize each to the original image with
nearest neighbour (``projects/inference_with_deploy.py``, ``demo/citrusv_gradio_app.py``; its evaluation script
does the same when the sizes differ). Here each mask is already at the original size — the very mask
``grounding`` holds — so those clients' resize leaves it unchanged and they draw exactly ``grounding``'s masks,
whatever post-processing made them.

``image_grid_thw`` is given per image as ``[1, h, w]`` in merged tokens (28-pixel cells of the smart-resized
image), which is how upstream's clients read it (``grid * 28`` = the size the model's boxes refer to).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from ..processing.boxes import model_size
from .protocol import Grounding, RawResponse


def image_grids(images: Sequence[Image.Image], processor) -> list[list[int]]:
    """``[1, h, w]`` merged-token grid of each image under ``processor``'s smart-resize bounds."""
    image_processor = processor.image_processor
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    cell = patch * merge
    grids = []
    for image in images:
        width, height = model_size(*image.size, processor.min_pixels, processor.max_pixels, patch, merge)
        grids.append([1, height // cell, width // cell])
    return grids


def to_raw_response(grounding: Grounding | None, images: Sequence[Image.Image], processor) -> RawResponse:
    """The first choice's ``grounding`` masks (the same COCO RLE) and the request's image grids."""
    masks = [mask.segmentation for mask in grounding.masks] if grounding is not None else []
    return RawResponse(seg_masks_rle=masks, image_grid_thw=image_grids(images, processor))
