"""Point loss: trains the ``[SEG]`` point head to find its target's innermost pixel.

The point head itself (:mod:`citrus_v.modeling.point_head`) is part of the grounding path: at inference it
gives SAM 2 a positive point next to the projected ``[SEG]`` embedding. This objective is only how it learns
in training: the L1 distance between its guess and the target mask's innermost pixel
(:func:`interior_points`), both as fractions of the side, summed over masks and divided by the masks of the
accumulated batch, as the mask losses are. A ``[SEG]`` about a volume or clip is trained towards its target's
innermost pixel on the training frame where the target is largest (its one point goes to every frame).
Config key ``point_loss_weight`` (on whenever the model has a point head and the batch has masks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Objective, ObjectiveInputs


def interior_points(masks: torch.Tensor) -> torch.Tensor:
    """The innermost pixel of each binary mask ``[K, h, w]`` as ``[K, 2]`` (x, y) pixel indices; NaN for an
    empty mask.

    Innermost: the pixels left after the most 3×3 erosions, the one nearest to their centroid (a centroid
    alone can fall outside a crescent such as a lung).
    """
    points = torch.full((masks.shape[0], 2), float("nan"), device=masks.device)
    for k, mask in enumerate(masks):
        core = (mask > 0.5).float()[None, None]
        if not bool(core.any()):
            continue
        while True:
            eroded = -F.max_pool2d(-core, 3, stride=1, padding=1)
            # the image edge does not erode (the pooling pads with -inf): a mask filling the image would
            # erode to itself for ever, and all its pixels are equally inner
            if not bool(eroded.any()) or torch.equal(eroded, core):
                break
            core = eroded
        ys, xs = torch.nonzero(core[0, 0], as_tuple=True)
        centre_y, centre_x = ys.float().mean(), xs.float().mean()
        nearest = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2).argmin()
        points[k] = torch.stack([xs[nearest], ys[nearest]]).to(points.dtype)
    return points


def point_loss(predicted: torch.Tensor, target: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """L1 distance per point (mean over x and y, both as fractions of the image side), summed over the
    points with a target (rows of ``target`` that are not NaN) and divided by ``count``."""
    known = ~torch.isnan(target).any(dim=-1)
    distance = (predicted[known].float() - target[known].float()).abs().mean(dim=-1)
    count = torch.as_tensor(count, dtype=torch.float32, device=predicted.device).clamp(min=1)
    return distance.sum() / count


class PointLoss(Objective):
    name = "point_loss"
    log_name = "point"
    weight_key = "point_loss_weight"
    preset = {weight_key: 1.0}

    def weight(self, config: Any) -> float:
        return float(getattr(config, self.weight_key, 1.0))

    def enabled(self, config: Any) -> bool:
        return bool(getattr(config, "seg_point_head", False)) and self.weight(config) > 0

    def active(self, targets: dict[str, Any]) -> bool:
        return True  # its targets are the [SEG] masks themselves

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        parts = [part for part in (self._images(inputs), self._videos(inputs)) if part is not None]
        return sum(parts[1:], parts[0]) if parts else None

    @staticmethod
    def _images(inputs: ObjectiveInputs) -> torch.Tensor | None:
        """The 2-D ``[SEG]`` tokens against their masks."""
        if inputs.seg_points is None or inputs.gt_masks is None:
            return None
        points = torch.cat(inputs.seg_points)
        if points.shape[0] == 0:
            return None
        masks = torch.cat([m.to(points.device) for m in inputs.gt_masks])
        if masks.shape[0] != points.shape[0]:
            raise ValueError(f"{masks.shape[0]} ground-truth mask(s) for {points.shape[0]} [SEG] token(s)")
        size = inputs.model.grounding_encoder.image_size
        with torch.no_grad():
            target = (interior_points(masks) + 0.5) / masks.shape[-1]
        count = inputs.num_masks_in_batch if inputs.num_masks_in_batch is not None else points.shape[0]
        return point_loss((points + 0.5) / size, target, count)

    @staticmethod
    def _videos(inputs: ObjectiveInputs) -> torch.Tensor | None:
        """The ``[SEG]`` tokens of volumes and clips: inference gives SAM 2 their one point on every frame, so it
        is trained towards the target's innermost pixel on the training frame where the target is largest."""
        if not inputs.video_seg_points or inputs.video_masks is None:
            return None
        predicted, targets = [], []
        for points, masks in zip(inputs.video_seg_points, inputs.video_masks, strict=True):
            if points is None or masks is None or points.shape[0] == 0:
                continue
            masks = masks.to(points.device)
            largest = masks.flatten(2).sum(dim=-1).argmax(dim=1)  # [K]: each target's largest training frame
            chosen = masks[torch.arange(masks.shape[0], device=masks.device), largest]
            with torch.no_grad():
                targets.append((interior_points(chosen) + 0.5) / chosen.shape[-1])
            predicted.append(points)
        if not predicted:
            return None
        points = torch.cat(predicted)
        count = inputs.num_video_masks if inputs.num_video_masks is not None else points.shape[0]
        return point_loss((points + 0.5) / inputs.model.grounding_encoder.image_size, torch.cat(targets), count)
