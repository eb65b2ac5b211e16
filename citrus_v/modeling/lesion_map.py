"""A training-only auxiliary loss that keeps the vision path alive: which image tokens hold a lesion.

A small language model quickly learns the majority answer of a yes/no or box question from the text alone;
the gradient reaching the vision tower then fades and a small local finding is averaged away. A linear head
on the merger's output tokens (one logit per merged token, i.e. per 28x28-pixel cell) predicting whether the
cell contains lesion pixels gives the vision tower a direct, local signal. The head is used only when a
batch carries ``lesion_map_targets``; generation never calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
                f"lesion_map_targets has {targets.shape[0]} entries but the images gave {image_tokens.shape[0]} "
                "merged tokens: build the targets with the same processor as the pixel values"
            )
        known = targets >= 0
        if not bool(known.any()):
            return None
        logits = self(image_tokens[known].to(self.proj.weight.dtype))
        return F.binary_cross_entropy_with_logits(logits.float(), targets[known].float())
