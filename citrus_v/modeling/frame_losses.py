"""The losses of volume and clip samples: mask losses on the frames that show the target, presence on every frame.

For each ``[SEG]`` of a video sample (:class:`~.video_segmentation.VideoSegDecoding` over its ``F`` training
frames, ``gt_video_masks`` ``[K, F, h, w]``, ``gt_video_present`` ``[K, F]``):

- **mask BCE and Dice** (the 2-D losses, :mod:`.losses`) on the frames where the target is present, averaged
  over those frames, so that one 3-D mask weighs as one 2-D mask; with ``multimask_min_loss`` on the best of
  SAM 2's candidates, with the IoU head's loss, as on images. With memory propagation a frame that SAM 2's object
  score calls absent holds its no-object fill, which has no gradient: it gets no mask loss (the presence loss
  below teaches that frame), and the frames it keeps are averaged;
- **presence**: the sigmoid BCE of SAM 2's object-score logit against the truth, averaged over all ``F`` frames.

Each is summed over the ``[SEG]`` tokens; the model divides by the masks of the accumulated batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .losses import best_candidates, dice_loss_each, mask_bce_each, presence_bce_each
from .video_segmentation import VideoSegDecoding, VideoTargetError


@dataclass
class VideoLossSums:
    """Per-``[SEG]`` losses of the batch's video samples, summed over their ``[SEG]`` tokens (``masks`` of them):
    mask BCE and Dice, the IoU head's loss (None without candidates to rank) and presence."""

    bce: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor | None
    presence: torch.Tensor
    masks: int


@dataclass
class MaskLossSettings:
    """How the mask losses are made (the model configuration's values)."""

    bce_weight: float
    dice_weight: float
    dice_eps: float
    min_loss: bool  # multimask_min_loss: train the best candidate, and the IoU head to rank them


def _frame_weights(used: torch.Tensor) -> torch.Tensor:
    """``[K, F]`` weights that average each row over its used frames (0 where unused, and for a row with none)."""
    counts = used.sum(dim=1, keepdim=True).clamp(min=1)
    return used.float() / counts


def _sample_sums(
    decoding: VideoSegDecoding, targets: torch.Tensor, present: torch.Tensor, settings: MaskLossSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One video sample's summed mask BCE, Dice, IoU-head loss and presence loss."""
    device = decoding.logits.device
    targets, present = targets.to(device), present.to(device).bool()
    used = present & (decoding.object_scores.detach() > 0) if decoding.tracked else present
    weights = _frame_weights(used)[used]
    goal = targets[used].float()
    iou = None
    if settings.min_loss and decoding.candidates is not None:
        chosen, squared = best_candidates(
            decoding.candidates[used], decoding.candidate_iou[used], goal, settings.bce_weight,
            settings.dice_weight, settings.dice_eps,
        )  # fmt: skip
        iou = (squared * weights).sum()
    else:
        chosen = decoding.logits[used]
    bce = (mask_bce_each(chosen, goal) * weights).sum()
    dice = (dice_loss_each(chosen, goal, settings.dice_eps) * weights).sum()
    presence = presence_bce_each(decoding.object_scores, present).sum()
    return bce, dice, iou, presence


def video_loss_sums(
    decodings: Sequence[VideoSegDecoding | None],
    gt_video_masks: Sequence[torch.Tensor | None],
    gt_video_present: Sequence[torch.Tensor | None],
    settings: MaskLossSettings,
) -> VideoLossSums | None:
    """The summed losses of every video sample with ``[SEG]`` tokens (None when the batch has none)."""
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    masks = 0
    for index, (decoding, targets, present) in enumerate(zip(decodings, gt_video_masks, gt_video_present,
                                                             strict=True)):  # fmt: skip
        if decoding is None:
            continue
        if targets is None or present is None or tuple(present.shape) != tuple(decoding.object_scores.shape):
            shape = None if present is None else tuple(present.shape)
            raise VideoTargetError(
                f"video sample {index}: {tuple(decoding.object_scores.shape)} [SEG] x frame decodings but presence "
                f"targets of shape {shape}: give gt_video_masks [K, F, h, w] and gt_video_present [K, F] as the "
                "processor makes them"
            )
        if tuple(targets.shape[-2:]) != tuple(decoding.logits.shape[-2:]):
            raise VideoTargetError(
                f"video sample {index}: mask targets are {tuple(targets.shape[-2:])}, the model predicts "
                f"{tuple(decoding.logits.shape[-2:])}; prepare targets with CitrusVProcessor"
            )
        parts.append(_sample_sums(decoding, targets, present, settings))
        masks += int(targets.shape[0])
    if not parts:
        return None
    ious = [part[2] for part in parts if part[2] is not None]
    return VideoLossSums(
        bce=torch.stack([part[0] for part in parts]).sum(),
        dice=torch.stack([part[1] for part in parts]).sum(),
        iou=torch.stack(ious).sum() if ious else None,
        presence=torch.stack([part[3] for part in parts]).sum(),
        masks=masks,
    )
