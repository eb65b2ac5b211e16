"""A :class:`~citrus_v.infer.results.Prediction`'s boxes and masks as the API's ``grounding`` object: 2-D masks and
boxes on the first image, and for a request with a volume or clip one mask per ``[SEG]`` through every frame of
the first video (:mod:`~citrus_v.serve.volume_grounding`)."""

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
    """Boxes and COCO-RLE masks in original-image pixels, and the volume masks of a video; ``None`` when the
    request had neither an image nor a video."""
    from .volume_grounding import to_volume_masks, video_size

    size = video_size(prediction)
    if prediction.image_size is None and size is None:
        return None
    grounding = _image_grounding(prediction)
    if size is not None:
        grounding.video_index = 0
        grounding.video_size = size
        grounding.volume_masks = to_volume_masks(prediction)
        grounding.notes = [str(note) for note in getattr(prediction, "notes", None) or []]
    return grounding


def _image_grounding(prediction: Prediction) -> Grounding:
    """The 2-D part: boxes and masks on the first image (``image_index`` and ``image_size`` null without one)."""
    from ..media import mask_to_rle

    if prediction.image_size is None:
        return Grounding(image_index=None, image_size=None)
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
