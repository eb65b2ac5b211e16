"""Detection metrics on ``[x1, y1, x2, y2]`` boxes in original-image pixels.

- **Single-box questions** (one ground-truth box; upstream's metric): the first box of the answer is
  compared with the ground truth; IoU = intersection / union of the two rectangles (areas ``(x2-x1)(y2-y1)``,
  no +1). Acc@IoU≥0.5 is the share of questions with IoU ≥ 0.5; mean IoU averages the IoU. An answer without
  a parsable box scores IoU 0 (counted as unparsable, never dropped).
- **Multi-box answers** (two or more ground-truth boxes): COCO average precision through ``pycocotools``'
  ``COCOeval`` (``iouType="bbox"``, one class, each question one COCO image, 101-point interpolation,
  maxDets 100, all areas): AP50 at IoU 0.5, AP50:95 averaged over IoU 0.50:0.05:0.95. The model gives no
  confidence, so boxes are ranked in the order the answer writes them: the k-th box (0-based) of an
  answer gets score 1 / (k + 1).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

Xyxy = Sequence[float]


def box_iou(a: Xyxy, b: Xyxy) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (0.0 when the union is empty)."""
    from ..media.boxes import Box

    return Box(*map(float, a)).iou(Box(*map(float, b)))


def first_box_iou(pred: Sequence[Xyxy], gt: Xyxy) -> float:
    """IoU of the answer's first box with the single ground-truth box (0.0 when the answer has no box)."""
    return box_iou(pred[0], gt) if pred else 0.0


def _xywh(box: Xyxy) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)]


def coco_ap(items: Sequence[tuple[Sequence[Xyxy], Sequence[Xyxy], tuple[int, int]]]) -> dict[str, float | None]:
    """``{"AP50", "AP50:95"}`` of ``items`` = ``(predicted boxes, ground-truth boxes, (width, height))``.

    ``None`` for both when there is no ground-truth box; 0.0 when there are boxes but no prediction.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for image_id, (pred, gt, (width, height)) in enumerate(items, start=1):
        images.append({"id": image_id, "width": int(width), "height": int(height)})
        for box in gt:
            xywh = _xywh(box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": xywh,
                "area": xywh[2] * xywh[3], "iscrowd": 0,
            })
        for rank, box in enumerate(pred):
            detections.append({"image_id": image_id, "category_id": 1, "bbox": _xywh(box), "score": 1.0 / (rank + 1)})
    if not annotations:
        return {"AP50": None, "AP50:95": None}
    if not detections:
        return {"AP50": 0.0, "AP50:95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt_api = COCO()
        gt_api.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(detections)
        evaluator = COCOeval(gt_api, dt_api, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50 = float(evaluator.stats[0]), float(evaluator.stats[1])
    return {"AP50": max(ap50, 0.0), "AP50:95": max(ap, 0.0)}
