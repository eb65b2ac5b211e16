"""The ``[SEG]`` point head: each ``[SEG]`` also says where its target is, and SAM 2 gets that as a point.

SAM 2's decoder finds a target from a positive point through the point's positional encoding, which
matches the image's own positional encoding at that spot. A random-init SAM taught by language alone
learns to separate targets that look different, but not those told apart only by position (left from
right lung, left from right kidney): a "left lung" prompt drew both lungs, even with a perfectly separable
embedding per organ.

With ``CitrusVConfig.seg_point_head`` a small head on each ``[SEG]`` hidden state predicts the target's
innermost pixel (:func:`interior_points`), trained by :func:`point_loss`; SAM 2 receives that point as a
positive point prompt next to the projected ``[SEG]`` embedding. In training a share of the masks
(``point_prompt_probability``) get a real point inside the target instead, as SAM itself is trained, so
SAM learns to select by position; the rest get the predicted point, so SAM also learns how far to trust
it (a lesion the language model has not located gets a poor point, and the embedding says "lesion").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .seg_projector import SegProjector


class PointHead(nn.Module):
    """Where a ``[SEG]``'s target is: ``[K, hidden]`` states -> ``[K, 2]`` (x, y) logits (a sigmoid gives the
    fraction of the image side).

    The ``[SEG]`` states of different targets differ by little next to what they share (left and right lung
    most of all: "Sure, the left lung is [SEG]." and "... right lung ..." end alike), so the head reads them
    standardised per feature, with running statistics updated in training (as batch norm keeps them, but
    used in training too: a batch may hold a single ``[SEG]``); they stay put while the head is frozen.
    Measured on a tiny model's states: 7.1 px mean error at 64 px with standardising vs 10.0 without, after
    the same 1,500 steps.
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


def interior_points(masks: torch.Tensor) -> torch.Tensor:
    """The innermost pixel of each binary mask ``[K, h, w]`` as ``[K, 2]`` (x, y) pixel indices; NaN for an
    empty mask.

    Innermost: the pixels left after the most 3×3 erosions, the one nearest to their centroid (a centroid
    alone can fall outside a crescent such as a lung).
    """
    points = torch.full((masks.shape[0], 2), float("nan"), device=masks.device)
    for k, mask in enumerate(masks):
        core = (mask > 0.5).float()[None, None]
        if not bool(core.any()):
            continue
        while True:
            eroded = -F.max_pool2d(-core, 3, stride=1, padding=1)
            # the image edge does not erode (the pooling pads with -inf): a mask filling the image would
            # erode to itself for ever, and all its pixels are equally inner
            if not bool(eroded.any()) or torch.equal(eroded, core):
                break
            core = eroded
        ys, xs = torch.nonzero(core[0, 0], as_tuple=True)
        centre_y, centre_x = ys.float().mean(), xs.float().mean()
        nearest = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2).argmin()
        points[k] = torch.stack([xs[nearest], ys[nearest]]).to(points.dtype)
    return points


def point_loss(predicted: torch.Tensor, target: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """L1 distance per point (mean over x and y, both as fractions of the image side), summed over the
    points with a target (rows of ``target`` that are not NaN) and divided by ``count`` (the masks in the
    accumulated batch, as the mask losses are)."""
    known = ~torch.isnan(target).any(dim=-1)
    distance = (predicted[known].float() - target[known].float()).abs().mean(dim=-1)
    count = torch.as_tensor(count, dtype=torch.float32, device=predicted.device).clamp(min=1)
    return distance.sum() / count
