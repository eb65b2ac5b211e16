"""3-D segmentation metrics on mask stacks ``[N, H, W]``: Dice, HD95 in mm, volume in mL and volume error.

A stack is one boolean mask per frame, on the grid of the volume the question is about (frame ``k`` is the
volume's display frame ``k``); ``spacing`` is ``(between frames, row, column)`` in millimetres.

- **Dice** over all voxels (:func:`citrus_v.eval.seg_metrics.dice`, which is the same formula in any number of
  dimensions): 1 when both stacks are empty, 0 when exactly one is.
- **HD95** (:func:`citrus_v.eval.seg_metrics.hd95` on the stacks with the 3-D spacing): surface voxels are
  foreground voxels with a background 6-neighbour (the first and last frames and the frame border count as
  background), distances are exact Euclidean distance transforms in mm. Both stacks empty: 0; exactly one
  empty: undefined (``None``), counted apart. The stacks are cropped to the box holding both masks (plus one
  voxel) first: the distances between the two surfaces do not change, the transform gets faster.
- **Volume** in mL = voxels × Δframe × Δrow × Δcolumn / 1000 (a voxel of 1 × 1 × 1 mm is 0.001 mL), the
  same formula as ``prediction.json``'s ``volume_ml`` (:mod:`citrus_v.infer.volume_measures`).
- **Volume error** = |V_pred − V_truth| / V_truth, a fraction (0.10 is 10 %); undefined when the truth is
  empty.
- A **clip**'s frames are moments, not slices: a clip gets its Dice over the stack, and neither HD95 nor a
  volume (the same rule as ``volume_measures``). A volume without spacing gets Dice only.

Summaries use the median for HD95 and the volume error (one missed lesion gives a volume error of 100 % and
an HD95 as large as the scan; the median says what a typical target gets), the mean for Dice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import seg_metrics

Spacing = tuple[float, float, float]

# The quality bars for the held-out volumes: (metric key, what it is, direction, bar).
BARS: tuple[tuple[str, str, str, float], ...] = (
    ("dice", "mean 3-D Dice", ">=", 0.75),
    ("volume_error_median", "median volume error", "<=", 0.15),
)


@dataclass(frozen=True)
class StackScores:
    """One prediction stack against its reference stack."""

    dice: float
    hd95_mm: float | None  # None: undefined (one stack empty), a clip, or no spacing
    hd95_defined: bool
    predicted_ml: float | None  # None: a clip, or no spacing
    reference_ml: float | None
    volume_error: float | None  # None: no volumes, or an empty reference


def volume_ml(stack: np.ndarray, spacing: Sequence[float]) -> float:
    """The volume of a boolean ``[N, H, W]`` stack in millilitres."""
    step = _spacing(spacing)
    return int(np.count_nonzero(stack)) * float(np.prod(step)) / 1000.0


def volume_error(predicted_ml: float | None, reference_ml: float | None) -> float | None:
    """|V_pred − V_truth| / V_truth; ``None`` when either is unknown or the truth is empty."""
    if predicted_ml is None or reference_ml is None or reference_ml <= 0:
        return None
    return abs(predicted_ml - reference_ml) / reference_ml


def hd95_3d(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float | None:
    """HD95 in mm of two boolean stacks (see the module docstring), computed on their joint box."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"HD95 needs two [N, H, W] stacks of one shape, got {pred.shape} and {gt.shape}")
    window = _joint_box(pred | gt)
    if window is None:
        return 0.0
    return seg_metrics.hd95(pred[window], gt[window], _spacing(spacing))


def score_stacks(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None, clip: bool = False) -> StackScores:
    """Dice, HD95 (mm), both volumes (mL) and the volume error of one prediction stack against its reference."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(
            f"the predicted stack {pred.shape} and the reference stack {gt.shape} must both be [N, H, W] of one shape"
        )
    dice = seg_metrics.dice(pred, gt)
    if clip or spacing is None:
        return StackScores(dice, None, False, None, None, None)
    distance = hd95_3d(pred, gt, spacing)
    predicted, reference = volume_ml(pred, spacing), volume_ml(gt, spacing)
    return StackScores(dice, distance, distance is not None, predicted, reference, volume_error(predicted, reference))


def median(values: Sequence[float]) -> float | None:
    """The median (``None`` for no values)."""
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else None


def bar_met(value: float | None, direction: str, bar: float) -> bool | None:
    """Whether ``value`` meets ``bar`` (``>=`` or ``<=``); ``None`` when there is no value."""
    if value is None:
        return None
    return value >= bar if direction == ">=" else value <= bar


def _spacing(spacing: Sequence[float]) -> Spacing:
    step = tuple(float(s) for s in spacing)
    if len(step) != 3 or min(step) <= 0:
        raise ValueError(f"spacing {step} must be three positive millimetre values (between frames, row, column)")
    return step  # type: ignore[return-value]


def _joint_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The index box of ``mask`` grown by one voxel on each side (clipped to the array); ``None`` when empty.

    Cropping to it keeps every surface voxel a surface voxel (nothing outside the box is foreground), so the
    surface-to-surface distances are those of the whole stack.
    """
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, mask.shape[axis])))
    return tuple(box)
