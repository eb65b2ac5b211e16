"""Mask losses: sigmoid binary cross-entropy and Dice, summed per mask.

The ``*_sum`` functions return the *sum over masks* of the per-mask loss; the caller divides by the number of
masks in the whole (accumulated) batch, so every mask weighs the same however the masks fall into
micro-batches. The ``*_each`` functions give the per-mask values (used to pick SAM's best candidate).
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
