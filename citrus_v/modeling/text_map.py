"""A training-only auxiliary loss that teaches the vision tower to read: which character each patch shows.

Reading a lab report is OCR. A small vision tower trained only through the language model's answers does not
learn it: the answer formats and units come from the text alone, and the digits stay guesses. A linear head
on the merger's output tokens classifies, for each of the ``merge x merge`` patches a merged token covers,
the printable character whose glyph box holds the patch centre (class 0: none). The targets come from a
row's optional ``text_map``: a label image of ``images[0]``'s size whose pixel values are character classes
(:func:`char_class`). The head is used only when a batch carries ``text_map_targets``; generation never calls
it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# class 0 = no character; printable ASCII '!'..'~' -> 1..94 (a space is "no character")
FIRST_CHAR, LAST_CHAR = 33, 126
TEXT_MAP_CLASSES = LAST_CHAR - FIRST_CHAR + 2
IGNORE_CLASS = -1  # target of patches whose image has no text map


def char_class(char: str) -> int:
    """The text-map class of one character: 1..94 for printable ASCII, 0 for a space or anything else."""
    code = ord(char)
    return code - FIRST_CHAR + 1 if FIRST_CHAR <= code <= LAST_CHAR else 0


def class_char(label: int) -> str:
    """The character of a text-map class ("" for class 0)."""
    return chr(label - 1 + FIRST_CHAR) if 1 <= label < TEXT_MAP_CLASSES else ""


class TextMapHead(nn.Module):
    """Per merged image token, ``patches`` character logits (one set per patch the token merges)."""

    def __init__(self, hidden_size: int, patches: int, classes: int = TEXT_MAP_CLASSES) -> None:
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
                f"text_map_targets is {tuple(targets.shape)} but the images gave {image_tokens.shape[0]} merged "
                f"tokens of {self.patches} patches: build the targets with the same processor as the pixel values"
            )
        known = (targets >= 0).all(dim=-1)
        if not bool(known.any()):
            return None
        logits = self(image_tokens[known].to(self.proj.weight.dtype))
        return F.cross_entropy(logits.float().flatten(0, 1), targets[known].long().flatten())
