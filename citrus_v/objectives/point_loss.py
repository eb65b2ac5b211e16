"""Point loss: trains the ``[SEG]`` point head to find its target's innermost pixel.

The point head itself (:mod:`citrus_v.modeling.point_head`) is part of the grounding path: at inference it
gives SAM 2 a positive point next to the projected ``[SEG]`` embedding. This objective is only how it learns
in training: the L1 distance between its guess and the target mask's innermost pixel
(:func:`~.base.interior_points`), both as fractions of the side, summed over masks and divided by the masks of the
accumulated batch, as the mask losses are. A ``[SEG]`` about a volume or clip is trained towards its target's
innermost pixel on the training frame where the target is largest (its one point goes to every frame).
Config key ``point_loss_weight`` (on whenever the model has a point head and the batch has masks).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Objective, ObjectiveInputs, interior_points, point_distance_loss


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
        return point_distance_loss((points + 0.5) / size, target, count)

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
        size = inputs.model.grounding_encoder.image_size
        return point_distance_loss((points + 0.5) / size, torch.cat(targets), count)
