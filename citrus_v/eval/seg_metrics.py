"""Segmentation metrics on boolean masks: Dice, IoU and HD95 (95th-percentile Hausdorff distance).

Definitions (``P`` prediction, ``G`` ground truth, both boolean ``[H, W]`` of the same size):

- Dice = 2|P ∩ G| / (|P| + |G|); IoU = |P ∩ G| / |P ∪ G|. Both masks empty: 1 (nothing to find, nothing
  found); exactly one empty: 0.
- HD95 = max(P95 of the distances from P's surface pixels to G's surface, P95 of the distances from G's
  surface pixels to P's surface), in millimetres with the pixel spacing ``(row, column)``. A surface pixel is a
  foreground pixel with a background 4-neighbour (pixels on the image border count as surface). Distances
  are exact Euclidean distance transforms (``scipy.ndimage.distance_transform_edt`` with ``sampling``),
  percentiles with numpy's linear interpolation. Both masks empty: 0; exactly one empty: undefined
  (``None``), counted apart and left out of the mean.

The same functions take ``[N, H, W]`` mask stacks with a spacing of three values (a voxel's 6-neighbours
then decide its surface); :mod:`citrus_v.eval.seg3d_metrics` scores volumes with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} masks differ in size")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, gt = _pair(pred, gt)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (the image border counts as background)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance[from_surface]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float | None:
    """Symmetric 95th-percentile Hausdorff distance in units of ``spacing`` (one value per mask axis: ``(row,
    col)``, or ``(frame, row, col)`` for a stack; default pixels).

    Returns 0.0 when both masks are empty and ``None`` (undefined) when exactly one is.
    """
    pred, gt = _pair(pred, gt)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * pred.ndim))
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must give one positive value per mask axis ({pred.ndim})")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return None
    pred_surface, gt_surface = surface(pred), surface(gt)
    forward = _directed(pred_surface, gt_surface, spacing)
    backward = _directed(gt_surface, pred_surface, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def union_mask(masks: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The union of several boolean masks (or mask stacks) of ``shape`` (all-false when there are none)."""
    out = np.zeros(shape, dtype=bool)
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(shape):
            raise ValueError(f"a mask of size {mask.shape} does not match the image size {tuple(shape)}")
        out |= mask
    return out
