"""HookGrad: scale the gradient that flows back through a tensor, leave its value unchanged.

Applied to the seg projector's output in stage 3 (factor 0.001), it makes the mask losses reach the
projector and the language model 1/f times weaker, while SAM 2 (downstream of the hook) gets its full
gradient and the language-model loss is untouched. Equivalent to ``y = x * f + stopgrad(x) * (1 - f)``.
"""

from __future__ import annotations

import torch


def hook_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``tensor`` with a backward hook multiplying its gradient by ``factor``.

    A factor of 1.0, or a tensor that needs no gradient, is returned untouched.
    """
    if factor == 1.0 or not tensor.requires_grad:
        return tensor
    if factor < 0:
        raise ValueError(f"hook_grad_factor must be >= 0, got {factor}")
    out = tensor.view_as(tensor)  # a fresh node, so the hook touches this use only
    out.register_hook(lambda grad: grad * factor)
    return out
