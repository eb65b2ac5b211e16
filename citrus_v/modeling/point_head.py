"""The ``[SEG]`` point head: each ``[SEG]`` also says where its target is, and SAM 2 gets that as a point.

SAM 2's decoder finds a target from a positive point through the point's positional encoding, which
matches the image's own positional encoding at that spot. A random-init SAM taught by language alone
learns to separate targets that look different, but not those told apart only by position (left from
right lung, left from right kidney): a "left lung" prompt drew both lungs, even with a perfectly separable
embedding per organ.

With ``CitrusVConfig.seg_point_head`` a small head on each ``[SEG]`` hidden state predicts the target's
innermost pixel (trained by a training-only objective, :mod:`citrus_v.objectives`); SAM 2 receives that point as a
positive point prompt next to the projected ``[SEG]`` embedding. In training a share of the masks
(``point_prompt_probability``) get a real point inside the target instead, as SAM itself is trained, so
SAM learns to select by position; the rest get the predicted point, so SAM also learns how far to trust
it (a lesion the language model has not located gets a poor point, and the embedding says "lesion").
"""

from __future__ import annotations

import torch
from torch import nn

from .seg_projector import SegProjector


class PointHead(nn.Module):
    """Where a ``[SEG]``'s target is: ``[K, hidden]`` states -> ``[K, 2]`` (x, y) logits (a sigmoid gives the
    fraction of the image side).

    The ``[SEG]`` states of different targets differ by little next to what they share (left and right lung
    most of all: "Sure, the left lung is [SEG]." and "... right lung ..." end alike), so the head reads them
    standardised per feature, with running statistics updated in training (as batch norm keeps them, but
    used in training too: a batch may hold a single ``[SEG]``); they stay put while the head is frozen.
    Standardised states locate targets markedly better than raw ones after the same training.
    """

    def __init__(self, hidden_size: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(hidden_size))
        self.register_buffer("running_var", torch.ones(hidden_size))
        self.mlp = SegProjector(hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[K, hidden]`` -> ``[K, 2]`` logits of the target's (x, y) as fractions of the side."""
        # only while the head itself trains: a stage that freezes it (stage 2) must not move its statistics
        if self.training and hidden.shape[0] > 1 and any(p.requires_grad for p in self.mlp.parameters()):
            with torch.no_grad():
                states = hidden.detach().float()
                self.running_mean.lerp_(states.mean(dim=0).to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(states.var(dim=0).to(self.running_var.dtype), self.momentum)
        scale = (self.running_var + self.eps).rsqrt()
        return self.mlp(((hidden - self.running_mean) * scale).to(hidden.dtype))


def sample_prompt_points(target: torch.Tensor, probability: float, sam_image_size: int) -> torch.Tensor:
    """One positive point per mask of ``target`` ``[K, h, w]`` with probability ``probability``, uniform over
    the mask's pixels, in SAM input pixels ``[K, 2]`` (x, y); NaN for masks left without a point (and for
    empty masks). How SAM itself is trained to select by position."""
    points = torch.full((target.shape[0], 2), float("nan"), device=target.device)
    if target.shape[0] == 0:
        return points
    width = target.shape[-1]
    flat = (target.reshape(target.shape[0], -1) > 0.5).float()
    chosen = torch.rand(target.shape[0], device=target.device) < probability
    chosen &= flat.sum(dim=1) > 0
    if chosen.any():
        pixel = torch.multinomial(flat[chosen], 1)[:, 0]
        xy = torch.stack([pixel % width, pixel // width], dim=1).to(points.dtype)
        # a low-res mask pixel's centre in SAM input pixels (the prompt encoder adds the 0.5 back)
        points[chosen] = (xy + 0.5) * (sam_image_size / width) - 0.5
    return points
