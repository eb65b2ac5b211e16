"""The projector from the language model's ``[SEG]`` hidden state to a SAM 2 prompt embedding."""

from __future__ import annotations

import torch
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


class ResidualSegProjector(nn.Module):
    """Upstream's residual variant (``use_res_seg_projector``): Linear -> ReLU -> Linear -> Dropout, plus a
    linear map of the input (identity when the widths are equal).

    Parameter names match the released code: ``seg_projector.{linear1,linear2,residual_mapping}.*``.
    """

    def __init__(self, hidden_size: int, prompt_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, hidden_size)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(hidden_size, prompt_dim)
        self.dropout = nn.Dropout(dropout)
        self.residual_mapping = nn.Linear(hidden_size, prompt_dim) if hidden_size != prompt_dim else nn.Identity()
        self.hidden_size = hidden_size
        self.prompt_dim = prompt_dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project ``[..., hidden_size]`` states to ``[..., prompt_dim]`` prompt embeddings."""
        out = self.dropout(self.linear2(self.relu(self.linear1(hidden))))
        return out + self.residual_mapping(hidden)


def build_seg_projector(hidden_size: int, prompt_dim: int, dropout: float = 0.0, residual: bool = False) -> nn.Module:
    """The projector a configuration asks for: residual (upstream's variant) or the plain one."""
    cls = ResidualSegProjector if residual else SegProjector
    return cls(hidden_size, prompt_dim, dropout)
