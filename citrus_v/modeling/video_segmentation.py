"""Training on volumes and clips: each ``[SEG]`` of a video sample prompts SAM 2 on that sample's training frames.

A sample with 3-D masks brings its own SAM 2 frames (``sam_video_pixel_values`` ``[F, 3, S, S]``, chosen by the
processor, :mod:`citrus_v.processing.video_masks`). Every ``[SEG]`` prompt of the sample — the projected embedding
and point a 2-D image gets — is decoded on each of those frames:

- ``"per_frame"``: on every frame on its own, exactly as on a 2-D image (:meth:`GroundingEncoder.decode`, all of
  SAM 2's candidates kept, so that ``multimask_min_loss`` can train the best one as on images);
- ``"memory"`` (needs the model's ``propagator``, SAM 2's memory modules): as inference propagates
  (:meth:`~citrus_v.modeling.propagation.SegPropagator.propagate`): prompted on the frame with the highest object
  score, then carried through the other frames by SAM 2's memory, gradients flowing through the memory modules.

:func:`route_video_segs` says which ``[SEG]`` belongs to which video sample: in a padded batch a row's
``[SEG]`` tokens belong to that row's video when the row has one; a packed batch says it per ``[SEG]``
(``seg_video_index``, -1 for a ``[SEG]`` of an image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .grounding import GroundingEncoder
from .propagation import PROPAGATION_MODES, SegPropagator, encode_frames


class VideoTargetError(ValueError):
    """Video training inputs that do not fit the ``[SEG]`` tokens of the batch."""


@dataclass
class VideoBatch:
    """A training batch's volume and clip inputs, as the processor and packing give them: per sample with 3-D
    masks (per row with None for the others when ``seg_index`` is None) its SAM 2 training frames
    ``[F, 3, S, S]``, targets ``[K, F, h, w]`` and presence ``[K, F]``; ``seg_index`` per packed row, the video
    sample of each ``[SEG]``; ``num_masks`` the 3-D masks of the accumulated batch (None: this batch's)."""

    sam_pixel_values: Sequence[torch.Tensor | None] | None
    masks: Sequence[torch.Tensor | None]
    present: Sequence[torch.Tensor | None] | None
    seg_index: Sequence[torch.Tensor] | None = None
    num_masks: int | torch.Tensor | None = None


@dataclass
class VideoSegDecoding:
    """One video sample's ``K`` ``[SEG]`` prompts on its ``F`` training frames.

    ``logits`` ``[K, F, h, w]``: the kept low-res mask logits (with ``"memory"``, SAM 2's no-object fill on the
    frames its object score calls absent, which carry no gradient); ``object_scores`` ``[K, F]``;
    ``candidates`` ``[K, F, C, h, w]`` and ``candidate_iou`` ``[K, F, C]`` with ``"per_frame"`` (None with
    ``"memory"``, which keeps one mask per frame); ``tracked``: decoded with memory; ``points``: the point
    head's ``[K, 2]`` guesses, with their gradient (SAM 2 got them detached), None without a point head.
    """

    logits: torch.Tensor
    object_scores: torch.Tensor
    candidates: torch.Tensor | None
    candidate_iou: torch.Tensor | None
    tracked: bool
    points: torch.Tensor | None = None


def route_video_segs(
    seg_counts: Sequence[int],
    sam_video_pixel_values: Sequence[torch.Tensor | None],
    seg_video_index: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per row, the video sample of each of its ``[SEG]`` tokens (``[K_r]`` long, -1: a ``[SEG]`` of an image).

    Without ``seg_video_index`` (a padded batch) ``sam_video_pixel_values`` is per row, None for a row without
    3-D masks; with it (a packed batch) it is per video sample and ``seg_video_index`` names one per ``[SEG]``.
    """
    if seg_video_index is None:
        if len(sam_video_pixel_values) != len(seg_counts):
            raise VideoTargetError(
                f"sam_video_pixel_values has {len(sam_video_pixel_values)} entries for a batch of {len(seg_counts)} "
                "rows: give one per row (None for a row without 3-D masks), or seg_video_index for packed rows"
            )
        return [
            torch.full((count,), row if pixels is not None else -1, dtype=torch.long)
            for row, (count, pixels) in enumerate(zip(seg_counts, sam_video_pixel_values, strict=True))
        ]
    routes = []
    for row, (count, index) in enumerate(zip(seg_counts, seg_video_index, strict=True)):
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.numel() != count or (count and int(index.max()) >= len(sam_video_pixel_values)):
            raise VideoTargetError(
                f"row {row}: seg_video_index has {index.numel()} entries for {count} [SEG] token(s) and "
                f"{len(sam_video_pixel_values)} video sample(s)"
            )
        routes.append(index)
    return routes


def decode_video_segs(
    grounding: GroundingEncoder,
    propagator: SegPropagator | None,
    pixel_values: torch.Tensor,
    prompts: torch.Tensor,
    points: torch.Tensor | None,
    multimask_output: bool,
    mode: str = "per_frame",
) -> VideoSegDecoding:
    """``K`` prompts (``[K, D]``, points ``[K, 2]`` or None) on ``F`` frames (``[F, 3, S, S]``), with gradients."""
    if mode not in PROPAGATION_MODES:
        raise VideoTargetError(f"unknown propagation mode {mode!r}; choose one of {', '.join(PROPAGATION_MODES)}")
    parameter = next(grounding.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    if mode == "memory":
        if propagator is None:
            raise VideoTargetError(
                "train_propagation 'memory' needs SAM 2's memory modules, and this model has none (config.json has "
                "no sam2_memory_config). Fix: train with per_frame, or a model with the memory modules"
            )
        # the training frames of one row in one pass, as the per-frame path below encodes them
        frames = encode_frames(grounding, pixel_values, frames_per_pass=pixel_values.shape[0])
        results = propagator.propagate(frames, prompts, points, "memory", multimask_output)
        return VideoSegDecoding(
            logits=torch.stack([r.masks for r in results]),
            object_scores=torch.stack([r.object_scores for r in results]),
            candidates=None,
            candidate_iou=None,
            tracked=True,
        )
    features = grounding.image_features(pixel_values)
    frames = [
        grounding.decode(features.select(f), prompts, multimask_output, points=points)
        for f in range(pixel_values.shape[0])
    ]
    return VideoSegDecoding(
        logits=torch.stack([d.logits for d in frames], dim=1),
        object_scores=torch.stack([d.object_scores for d in frames], dim=1),
        candidates=torch.stack([d.candidates for d in frames], dim=1),
        candidate_iou=torch.stack([d.candidate_iou for d in frames], dim=1),
        tracked=False,
    )
