"""Lesion count: the image tokens say how many lesions there are.

A per-cell lesion target (the lesion-map objective) marks every cell a lesion touches, so two lesions side
by side and one large lesion look alike to it, and a tiny language model told only "2" or "3" rarely learns
to count them. Here a linear head on the same merged tokens says which cells hold a lesion's centre (one
cell per lesion).
The loss asks both that each cell is right and that an image's cell probabilities sum to its number of
lesions, as density-map counting does, so the count becomes a sum over the image tokens: something an
attention head that spreads over them can read. Targets come from a row's ``lesion_points`` annotation.
Config key ``lesion_count_loss_weight``; head ``lesion_count_head``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncodeContext, Objective, ObjectiveInputs, first_image_targets


class LesionCountHead(nn.Module):
    """One logit per merged image token: does its cell hold a lesion's centre?"""

    def __init__(self, hidden_size: int, count_weight: float = 0.25, prior: float = 1 / 64) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        self.count_weight = count_weight
        # a fixed offset, so that a fresh head (whatever its init) starts near one centre in 64 cells and not
        # at a count of half the cells, whose squared error would swamp every other loss at first
        self.offset = math.log(prior / (1 - prior))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` merged image tokens -> ``[N]`` logits."""
        return self.proj(image_tokens).squeeze(-1) + self.offset

    def count(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The lesion count the head reads from one image's ``[n, hidden]`` tokens: the sum of its cells'
        probabilities."""
        return torch.sigmoid(self(image_tokens.to(self.proj.weight.dtype)).float()).sum()

    def loss(
        self, image_tokens: torch.Tensor, targets: torch.Tensor, tokens_per_image: list[int]
    ) -> torch.Tensor | None:
        """Mean over the images with targets of the cells' BCE (mean over the image) plus ``count_weight``
        times the squared error of the image's count.

        ``targets`` ``[N]`` holds each cell's number of lesion centres, or -1 for the tokens of an image
        without them; ``tokens_per_image`` splits the ``N`` tokens by image. None when no image has targets.
        A sigmoid per cell, rather than a free density, keeps the sum stable: a shared bias moves every
        cell at once, and a linear output's sum over 64 cells swings 64 times as far.
        """
        if image_tokens.shape[0] != targets.shape[0] or sum(tokens_per_image) != targets.shape[0]:
            raise ValueError(
                f"lesion_count targets have {targets.shape[0]} entries but the images gave {image_tokens.shape[0]} "
                f"merged tokens ({sum(tokens_per_image)} by their grids): build the targets with the same "
                "processor as the pixel values"
            )
        losses = []
        for tokens, wanted in zip(
            image_tokens.split(tokens_per_image), targets.split(tokens_per_image), strict=True
        ):
            known = wanted >= 0
            if not bool(known.any()):
                continue
            logits = self(tokens[known].to(self.proj.weight.dtype)).float()
            wanted = wanted[known].float()
            cells = F.binary_cross_entropy_with_logits(logits, wanted.clamp(max=1))
            count = torch.sigmoid(logits).sum()
            losses.append(cells + self.count_weight * (count - wanted.sum()) ** 2)
        return torch.stack(losses).mean() if losses else None


def lesion_count_target(
    points: Sequence[Sequence[float]], size: tuple[int, int], cells: tuple[int, int]
) -> torch.Tensor:
    """``[rows * cols]`` in merged-token order: how many of ``points`` (each lesion's centre, ``(x, y)``
    pixels of an image of ``size`` ``(width, height)``) fall in each cell."""
    rows, cols = cells
    width, height = size
    target = torch.zeros(rows * cols)
    for x, y in points:
        row = min(max(int(y * rows / height), 0), rows - 1)
        col = min(max(int(x * cols / width), 0), cols - 1)
        target[row * cols + col] += 1
    return target


class LesionCount(Objective):
    name = "lesion_count"
    log_name = "lesion_count"
    weight_key = "lesion_count_loss_weight"
    layout = "image_tokens"
    reads = ("lesion_points",)
    head_attribute = "lesion_count_head"
    trains_with = "aligner"
    needs_image_tokens = True
    preset = {weight_key: 0.5}

    def build_head(self, config: Any) -> nn.Module:
        return LesionCountHead(config.vision_config.out_hidden_size)

    def encode(self, annotations: dict[str, Any], context: EncodeContext) -> torch.Tensor | None:
        points = annotations.get("lesion_points")
        if points is None:
            return None
        width, height = size = context.image_size
        outside = [list(p) for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
        if outside:
            raise ValueError(
                f"lesion_points {outside} lie outside the first image ({width}x{height}): give (x, y) pixels of it"
            )
        return first_image_targets(
            context.grid, context.merge, lambda cells, _: lesion_count_target(points, size, cells)
        )

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        merge = int(inputs.model.config.vision_config.spatial_merge_size) ** 2
        per_image = [int(n) // merge for n in inputs.image_grid_thw.prod(dim=-1).tolist()]
        return inputs.head(self).loss(inputs.image_tokens, inputs.targets, per_image)
