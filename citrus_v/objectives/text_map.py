"""Text map: which character each image patch shows — teaches the vision tower to read.

Reading a lab report is OCR. A small vision tower trained only through the language model's answers does not
learn it: the answer formats and units come from the text alone, and the digits stay guesses. A linear head
on the merger's output tokens classifies, for each of the ``merge x merge`` patches a merged token covers,
the printable character whose glyph box holds the patch centre (class 0: none). Targets come from a row's
``char_map`` annotation (:mod:`.annotations`). Config key ``text_map_loss_weight``; head ``text_map_head``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .annotations import CHAR_CLASSES, chars_per_patch, check_map_size
from .base import EncodeContext, Objective, ObjectiveInputs, first_image_targets


class TextMapHead(nn.Module):
    """Per merged image token, ``patches`` character logits (one set per patch the token merges)."""

    def __init__(self, hidden_size: int, patches: int, classes: int = CHAR_CLASSES) -> None:
        super().__init__()
        self.patches, self.classes = patches, classes
        self.proj = nn.Linear(hidden_size, patches * classes)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` merged image tokens -> ``[N, patches, classes]`` logits."""
        return self.proj(image_tokens).view(-1, self.patches, self.classes)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy over the patches of tokens that have a map (targets ``[N, patches]``, -1 = none).

        None when no token has a map.
        """
        if image_tokens.shape[0] != targets.shape[0] or targets.shape[-1] != self.patches:
            raise ValueError(
                f"text_map targets are {tuple(targets.shape)} but the images gave {image_tokens.shape[0]} merged "
                f"tokens of {self.patches} patches: build the targets with the same processor as the pixel values"
            )
        known = (targets >= 0).all(dim=-1)
        if not bool(known.any()):
            return None
        logits = self(image_tokens[known].to(self.proj.weight.dtype))
        return F.cross_entropy(logits.float().flatten(0, 1), targets[known].long().flatten())


class TextMap(Objective):
    name = "text_map"
    log_name = "text_map"
    weight_key = "text_map_loss_weight"
    layout = "image_tokens"
    reads = ("char_map",)
    head_attribute = "text_map_head"
    trains_with = "aligner"
    needs_image_tokens = True
    preset = {weight_key: 1.0}

    def build_head(self, config: Any) -> nn.Module:
        merge = int(config.vision_config.spatial_merge_size)
        return TextMapHead(config.vision_config.out_hidden_size, merge * merge)

    def encode(self, annotations: dict[str, Any], context: EncodeContext) -> torch.Tensor | None:
        labels = annotations.get("char_map")
        if labels is None:
            return None
        labels = check_map_size("char_map", np.asarray(labels), context.image_size)
        return first_image_targets(context.grid, context.merge, lambda cells, m: chars_per_patch(labels, cells, m))

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        return inputs.head(self).loss(inputs.image_tokens, inputs.targets)
