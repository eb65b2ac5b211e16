"""Weight layouts that make inference faster, the values unchanged and no second copy kept.

The predictor applies both (the patch embedding only to a model it loads itself); a checkpoint saved
afterwards has the same tensors under the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.modeling_citrus_v import CitrusV


def column_major_lm_head(model: CitrusV) -> None:
    """Store the language-model head's weight column-major (the same values, no second copy): on CPU, in
    float32, the matrix product of one decoding step runs faster that way (bfloat16 runs faster row-major, so
    the predictor leaves it as it is; see BENCHMARKS.md, "Side by side with ms-swift"). A head tied to the input
    embedding is left alone (the embedding lookup wants rows)."""
    head = model.mllm.get_output_embeddings()
    if head is None or head.weight is model.mllm.get_input_embeddings().weight:
        return
    with torch.no_grad():
        head.weight.data = head.weight.data.t().contiguous().t()


class LinearPatchEmbed(nn.Module):
    """Qwen2.5-VL's patch embedding as one matrix product: its Conv3d has a stride equal to its kernel, so each
    output is the kernel's dot product with one flattened patch — the rows the image processor already hands
    it. The Conv3d is kept as ``proj`` (the same parameter under the same name); only the call changes, which on
    CPU runs in under half the time of the 3-D convolution."""

    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        self.proj = patch_embed.proj
        self.patch_size = patch_embed.patch_size
        self.temporal_patch_size = patch_embed.temporal_patch_size
        self.in_channels = patch_embed.in_channels
        self.embed_dim = patch_embed.embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def linear_patch_embed(model: CitrusV) -> None:
    """Swap the vision tower's patch embedding for :class:`LinearPatchEmbed` (a no-op when it is one already, or
    when the tower has no 3-D convolution with a stride equal to its kernel)."""
    visual = model.mllm.model.visual
    current = visual.patch_embed
    proj = getattr(current, "proj", None)
    if isinstance(current, LinearPatchEmbed) or not isinstance(proj, nn.Conv3d):
        return
    if proj.stride != proj.kernel_size or proj.padding != (0, 0, 0) or proj.groups != 1:
        return
    visual.patch_embed = LinearPatchEmbed(current)
