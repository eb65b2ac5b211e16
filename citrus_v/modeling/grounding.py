"""The grounding encoder: transformers' SAM 2, prompted by projected ``[SEG]`` embeddings.

``GroundingEncoder`` *is* a ``transformers.Sam2Model`` (same parameters, same checkpoint names); it only
adds the two calls Citrus-V needs:

- ``image_features``: the image encoder's multi-level features **with gradients** (SAM 2's own
  ``get_image_embeddings`` runs under ``torch.no_grad()`` and would leave the image encoder untrained);
- ``decode``: one mask per language embedding, the embedding appended to the sparse prompt after SAM's
  "not a point" padding, multimask output, the mask with the highest predicted IoU kept (or SAM's
  single-mask output, for a config that asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Sam2Model


@dataclass
class SamImageFeatures:
    """SAM 2 image features for a batch: ``levels[-1]`` is the image embedding, the rest high-res."""

    levels: list[torch.Tensor]

    def select(self, index: int) -> SamImageFeatures:
        return SamImageFeatures([level[index : index + 1] for level in self.levels])


@dataclass
class DecodedMasks:
    """Best-IoU low-resolution mask logits ``[K, h, w]`` and their predicted IoU ``[K]``; all candidates
    ``[K, C, h, w]`` and their predicted IoU ``[K, C]`` (C = 3 with multimask output); SAM 2's object-score
    logits ``[K]`` (``pred_obj_score_head``: > 0 says the target is in the image; the masks are left as decoded)."""

    logits: torch.Tensor
    iou_scores: torch.Tensor
    candidates: torch.Tensor
    candidate_iou: torch.Tensor
    object_scores: torch.Tensor | None = None


class GroundingEncoder(Sam2Model):
    """SAM 2 (image encoder, prompt encoder, mask decoder) prompted by language embeddings."""

    @property
    def prompt_dim(self) -> int:
        return self.config.prompt_encoder_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.prompt_encoder_config.image_size

    @property
    def mask_size(self) -> tuple[int, int]:
        """Size of the low-resolution mask logits (256×256 for a 1024-pixel SAM 2)."""
        return tuple(self.prompt_encoder.mask_input_size)

    def image_features(self, pixel_values: torch.Tensor) -> SamImageFeatures:
        """Encode ``[B, 3, S, S]`` SAM inputs into multi-level features, keeping the autograd graph."""
        batch_size = pixel_values.shape[0]
        outputs = self.get_image_features(pixel_values, return_dict=True)
        feature_maps = list(outputs.fpn_hidden_states)
        # single images: no memory, so SAM 2 adds its learned "no memory" embedding to the lowest level
        feature_maps[-1] = feature_maps[-1] + self.no_memory_embedding
        levels = [
            feat.permute(1, 2, 0).reshape(batch_size, -1, *size)
            for feat, size in zip(feature_maps, self.backbone_feature_sizes, strict=True)
        ]
        return SamImageFeatures(levels)

    def decode(
        self,
        features: SamImageFeatures,
        prompt_embeddings: torch.Tensor,
        multimask_output: bool = True,
        points: torch.Tensor | None = None,
    ) -> DecodedMasks:
        """Decode one mask per row of ``prompt_embeddings`` ``[K, D]`` for a single image's ``features``.

        ``multimask_output`` (upstream): three candidates, the highest predicted IoU kept; otherwise SAM's
        single-mask output (one candidate). ``points`` ``[K, 2]`` (x, y in SAM input pixels; NaN for none)
        adds one positive point to a prompt: the ``[SEG]`` point head's (see :mod:`.point_head`), or in
        training a real one (``CitrusVConfig.point_prompt_probability``).
        """
        if features.levels[-1].shape[0] != 1:
            raise ValueError("decode() takes the features of one image; use SamImageFeatures.select(i)")
        num_prompts = prompt_embeddings.shape[0]
        image_embedding = features.levels[-1]
        device, dtype = image_embedding.device, image_embedding.dtype
        # one "not a point" (label -1) per prompt; the prompt encoder pads it as SAM 2 does without boxes
        coords = torch.zeros(1, num_prompts, 1, 2, device=device, dtype=dtype)
        labels = -torch.ones(1, num_prompts, 1, device=device, dtype=torch.int32)
        if points is not None:
            given = ~torch.isnan(points).any(dim=-1)
            coords[0, given, 0] = points[given].to(device=device, dtype=dtype)
            labels[0, given, 0] = 1
        sparse, dense = self.prompt_encoder(
            input_points=coords, input_labels=labels, input_boxes=None, input_masks=None
        )
        language = prompt_embeddings.to(sparse.dtype).view(1, num_prompts, 1, -1)
        sparse = torch.cat([sparse, language], dim=2)
        masks, iou, _, object_scores = self.mask_decoder(
            image_embeddings=image_embedding,
            image_positional_embeddings=self.get_image_wide_positional_embeddings().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_resolution_features=features.levels[:-1],
        )
        # masks [1, K, C, h, w], iou [1, K, C], object_scores [1, K, 1]: keep the highest predicted IoU
        best = iou[0].argmax(dim=-1)
        rows = torch.arange(num_prompts, device=best.device)
        return DecodedMasks(
            logits=masks[0, rows, best],
            iou_scores=iou[0, rows, best],
            candidates=masks[0],
            candidate_iou=iou[0],
            object_scores=object_scores[0, :, 0],
        )


def reinit_fan_in(module: nn.Module) -> int:
    """Re-initialise every Linear/Conv layer with PyTorch's default fan-in initialisation.

    transformers initialises SAM 2 with N(0, 0.02) and no fan-in scaling: from random weights the mask
    logits start near 1e-4 and training stalls. Use only on random-init models, never on loaded weights.
    Returns the number of layers re-initialised.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            layer.reset_parameters()
            count += 1
    return count
