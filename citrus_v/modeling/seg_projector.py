"""The projector from the language model's ``[SEG]`` hidden state to a SAM 2 prompt embedding."""

from __future__ import annotations

from torch import nn


class SegProjector(nn.Sequential):
    """Linear(h, h) -> ReLU -> Linear(h, d) -> Dropout.

    A ``Sequential`` so parameter names match the released checkpoint (``seg_projector.0.*``,
    ``seg_projector.2.*``).
    """

    def __init__(self, hidden_size: int, prompt_dim: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, prompt_dim),
            nn.Dropout(dropout),
        )
        self.hidden_size = hidden_size
        self.prompt_dim = prompt_dim
