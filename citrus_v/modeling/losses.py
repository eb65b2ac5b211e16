"""Mask losses: sigmoid binary cross-entropy and Dice, summed per mask.

The ``*_sum`` functions return the *sum over masks* of the per-mask loss; the caller divides by the number of
masks in the whole (accumulated) batch, so every mask weighs the same however the masks fall into
micro-batches. The ``*_each`` functions give the per-mask values (used to pick SAM's best candidate,
:func:`best_candidates`). :func:`presence_bce_each` is SAM 2's presence loss: its object-score logit against
whether the target is on the image or frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_bce_each(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE averaged over the pixels of each mask: ``[N, ...]`` -> ``[N]``."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_pixel.flatten(1).mean(1)


def dice_loss_each(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - (2·Σpt + eps) / (Σp + Σt + eps)`` per mask with ``p = sigmoid(logits)``: ``[N, ...]`` -> ``[N]``."""
    probs = logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    numerator = 2 * (probs * targets).sum(1) + eps
    denominator = probs.sum(1) + targets.sum(1) + eps
    return 1 - numerator / denominator


def mask_bce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE averaged over the pixels of each mask, summed over masks. Shapes ``[N, H, W]``."""
    return mask_bce_each(logits, targets).sum()


def dice_loss_sum(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Dice loss of each mask (:func:`dice_loss_each`), summed over masks."""
    return dice_loss_each(logits, targets, eps).sum()


def best_candidates(
    logits: torch.Tensor,
    predicted_iou: torch.Tensor,
    targets: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    eps: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's own objective over its candidates: for ``[N, C, h, w]`` candidate logits, their predicted IoU
    ``[N, C]`` and ``[N, h, w]`` targets, the candidate with the lowest weighted BCE + Dice per mask
    (``[N, h, w]``, with gradients) and the IoU head's squared error against every candidate's real IoU, averaged
    over the candidates (``[N]``)."""
    targets = targets.to(logits.device).float()
    with torch.no_grad():
        flat = logits.float().flatten(2)  # [N, C, hw]
        goal = targets.flatten(1)[:, None, :].expand_as(flat)
        pairs, goals = flat.flatten(0, 1), goal.flatten(0, 1)  # one row per (mask, candidate)
        cost = bce_weight * mask_bce_each(pairs, goals)
        cost = cost + dice_weight * dice_loss_each(pairs, goals, eps)
        best = cost.view(flat.shape[:2]).argmin(dim=1)
        hard = flat > 0
        inter = (hard & (goal > 0.5)).sum(-1).float()
        union = (hard | (goal > 0.5)).sum(-1).float()
        real_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    chosen = logits[torch.arange(logits.shape[0], device=logits.device), best]
    return chosen, ((predicted_iou.float() - real_iou) ** 2).mean(1)


def presence_bce_each(object_scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE of SAM 2's object-score logits against presence (1: the target is on the frame), averaged over
    the last axis: ``[N, F]`` -> ``[N]`` (``[N]`` -> ``[N]`` for one frame each)."""
    scores = object_scores.float()
    per_frame = F.binary_cross_entropy_with_logits(scores, present.to(scores.device).float(), reduction="none")
    return per_frame if per_frame.ndim == 1 else per_frame.mean(-1)
