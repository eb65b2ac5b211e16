"""A :class:`~citrus_v.infer.results.Prediction`'s boxes and masks as the API's ``grounding`` object."""

from __future__ import annotations

import numpy as np

from ..infer.results import Prediction
from .protocol import RLE, Grounding, GroundingBox, GroundingMask, ImageSize


def _coco_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x, y = int(xs.min()), int(ys.min())
    return [float(x), float(y), float(xs.max() + 1 - x), float(ys.max() + 1 - y)]


def to_grounding(prediction: Prediction) -> Grounding | None:
    """Boxes and COCO-RLE masks in original-image pixels; ``None`` when the request had no image."""
    from ..media import mask_to_rle

    if prediction.image_size is None:
        return None
    width, height = prediction.image_size
    boxes = [
        GroundingBox(bbox_2d=[float(b.x1), float(b.y1), float(b.x2), float(b.y2)], label=b.label or None)
        for b in prediction.boxes
    ]
    masks = [
        GroundingMask(
            index=m.index,
            label=m.label,
            score=float(m.score),
            bbox=_coco_bbox(m.mask),
            area=int(m.mask.sum()),
            segmentation=RLE(**mask_to_rle(m.mask)),
        )
        for m in prediction.masks
    ]
    return Grounding(image_index=0, image_size=ImageSize(width=width, height=height), boxes=boxes, masks=masks)
