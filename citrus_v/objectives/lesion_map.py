"""Lesion map: which image tokens hold a lesion — keeps a small model's vision path alive.

A small language model quickly learns the majority answer of a yes/no or box question from the text alone;
the gradient reaching the vision tower then fades and a small local finding is averaged away. A linear head
on the merger's output tokens (one logit per merged token, i.e. per 28x28-pixel cell) predicting whether the
cell contains lesion pixels gives the vision tower a direct, local signal. Targets come from a row's
``lesion_mask`` annotation. Config key ``lesion_map_loss_weight``; head ``lesion_map_head``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .annotations import check_map_size
from .base import EncodeContext, Objective, ObjectiveInputs, first_image_targets


class LesionMapHead(nn.Module):
    """One logit per merged image token: does this cell contain lesion?"""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` merged image tokens -> ``[N]`` logits."""
        return self.proj(image_tokens).squeeze(-1)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Mean BCE over the tokens whose target is 0 or 1 (``-1`` = no map); None when there are none."""
        if image_tokens.shape[0] != targets.shape[0]:
            raise ValueError(
                f"lesion_map targets have {targets.shape[0]} entries but the images gave {image_tokens.shape[0]} "
                "merged tokens: build the targets with the same processor as the pixel values"
            )
        known = targets >= 0
        if not bool(known.any()):
            return None
        logits = self(image_tokens[known].to(self.proj.weight.dtype))
        return F.binary_cross_entropy_with_logits(logits.float(), targets[known].float())


def lesion_map_target(mask: np.ndarray, cells: tuple[int, int]) -> torch.Tensor:
    """``[rows * cols]`` in merged-token order: 1.0 where a cell holds any lesion pixel (the mask averaged
    over each cell by a box filter, so a partly covered cell counts as lesion)."""
    rows, cols = cells
    coverage = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((cols, rows), Image.Resampling.BOX))
    return torch.from_numpy((coverage > 0).reshape(-1)).float()


class LesionMap(Objective):
    name = "lesion_map"
    log_name = "lesion_map"
    weight_key = "lesion_map_loss_weight"
    layout = "image_tokens"
    reads = ("lesion_mask",)
    head_attribute = "lesion_map_head"
    trains_with = "aligner"  # the head reads the merger's output, so it trains with the aligner
    needs_image_tokens = True
    preset = {weight_key: 1.0}

    def build_head(self, config: Any) -> nn.Module:
        return LesionMapHead(config.vision_config.out_hidden_size)

    def encode(self, annotations: dict[str, Any], context: EncodeContext) -> torch.Tensor | None:
        mask = annotations.get("lesion_mask")
        if mask is None:
            return None
        mask = check_map_size("lesion_mask", np.asarray(mask) > 0, context.image_size)
        return first_image_targets(context.grid, context.merge, lambda cells, _: lesion_map_target(mask, cells))

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        return inputs.head(self).loss(inputs.image_tokens, inputs.targets)
