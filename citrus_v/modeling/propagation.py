"""SAM 2's memory path for volumes and clips: one ``[SEG]`` prompt, a mask on every frame.

A volume's slices or a clip's frames are encoded one at a time by the grounding encoder's own SAM 2 image
encoder (:func:`encode_frames`). A ``[SEG]`` prompt — the projected embedding (and point) that
``CitrusV.seg_prompts`` gives SAM 2 for a 2-D image — then becomes a mask on every frame in one of two modes:

- ``"per_frame"`` (:func:`prompt_frames`, no memory modules needed): the prompt on every frame on its own,
  exactly as on a 2-D image; SAM 2's object-score head (``pred_obj_score_head``) says on which frames the
  target is present, and a frame with a negative score gets no mask;
- ``"memory"`` (:meth:`SegPropagator.propagate`): the prompt on the frame where the object score is highest,
  then SAM 2's memory carries the mask through the rest in both directions — memory attention over the
  memories of earlier frames and their object pointers, the memory encoder on each new mask — as SAM 2
  tracks an object in a video; each tracked frame's own object score still decides whether it gets a mask.

:class:`SegPropagator` is a transformers ``Sam2VideoModel`` that holds only the memory modules (memory
attention, memory encoder, object-pointer projection, temporal encodings, "no object" embeddings); its image
encoder, prompt encoder, mask decoder and "no memory" embedding *are* the grounding encoder's modules, read
through properties and never registered twice, so there is one copy of those weights and the checkpoint
keeps one name for each. The memory steps are transformers' own (``_prepare_memory_conditioned_features``,
``_encode_new_memory``, the memory bank of a ``Sam2VideoInferenceSession``); only the prompt differs: the
``[SEG]`` embedding is appended to the sparse prompt after SAM's "not a point" padding, as in the 2-D path,
where transformers' session API takes points, boxes or masks. Nothing here runs under ``inference_mode``,
so the same path can be trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, Sam2Config, Sam2VideoConfig
from transformers.models.sam2_video.modeling_sam2_video import (
    Sam2VideoFeedForward,
    Sam2VideoInferenceSession,
    Sam2VideoMemoryAttention,
    Sam2VideoMemoryEncoder,
    Sam2VideoModel,
)

from .grounding import GroundingEncoder

PropagationMode = Literal["per_frame", "memory"]
PROPAGATION_MODES: tuple[str, ...] = ("per_frame", "memory")
# the mask logit SAM 2 writes on a frame where the object is absent (transformers' NO_OBJ_SCORE)
NO_OBJECT_LOGIT = -1024.0
# the Sam2VideoConfig fields a CitrusVConfig.sam2_memory_config may set (the memory modules' architecture)
MEMORY_FIELDS = frozenset(
    set(Sam2VideoConfig.__dataclass_fields__)
    - set(PreTrainedConfig.__dataclass_fields__)
    - {"vision_config", "prompt_encoder_config", "mask_decoder_config", "image_size"}
)


def video_config(sam2: Sam2Config, memory: Mapping[str, Any]) -> Sam2VideoConfig:
    """The ``Sam2VideoConfig`` of a grounding encoder's SAM 2 with memory modules set by ``memory``.

    Widths follow the image encoder (SAM 2's memory attention and encoder are as wide as its features, the
    fuser four times, the feed-forward eight times); the memory attention's rotary grid is the lowest-resolution
    feature map. ``memory`` overrides any of :data:`MEMORY_FIELDS`; an unknown key is an error naming it.
    """
    unknown = sorted(set(memory) - MEMORY_FIELDS)
    if unknown:
        raise ValueError(
            f"sam2_memory_config has unknown field(s) {unknown}; the memory fields of transformers' "
            f"Sam2VideoConfig are: {', '.join(sorted(MEMORY_FIELDS))}"
        )
    width = sam2.vision_config.fpn_hidden_size
    fields: dict[str, Any] = {
        "memory_attention_hidden_size": width,
        "memory_attention_feed_forward_hidden_size": 8 * width,
        "memory_attention_rope_feat_sizes": list(sam2.vision_config.backbone_feature_sizes[-1])[::-1],
        "memory_encoder_hidden_size": width,
        "mask_downsampler_embed_dim": width,
        "memory_fuser_embed_dim": width,
        "memory_fuser_intermediate_dim": 4 * width,
    }
    fields.update(memory)
    return Sam2VideoConfig(
        vision_config=sam2.vision_config.to_dict(),
        prompt_encoder_config=sam2.prompt_encoder_config.to_dict(),
        mask_decoder_config=sam2.mask_decoder_config.to_dict(),
        image_size=sam2.prompt_encoder_config.image_size,
        **fields,
    )


@dataclass
class FrameFeatures:
    """One frame's SAM 2 image features before any memory, in transformers' ``get_image_features`` layout.

    ``levels``: the feature maps flattened to ``[h*w, 1, C]``, highest resolution first (the first two already
    through the mask decoder's ``conv_s0``/``conv_s1``); ``position``: the lowest level's position encoding
    ``[h*w, 1, C]``, which memory attention reads.
    """

    levels: list[torch.Tensor]
    position: torch.Tensor


@dataclass
class FrameDecoding:
    """SAM 2's answer for K prompts on one frame: low-res mask logits ``[K, h, w]`` (``NO_OBJECT_LOGIT`` where
    the object score is negative), predicted IoU ``[K]``, object-score logits ``[K]`` and the output token of
    the kept mask ``[K, D]`` (what an object pointer is made from)."""

    masks: torch.Tensor
    iou_scores: torch.Tensor
    object_scores: torch.Tensor
    tokens: torch.Tensor

    def select(self, k: int) -> FrameDecoding:
        """Object ``k`` alone (K = 1)."""
        parts = (self.masks, self.iou_scores, self.object_scores, self.tokens)
        return FrameDecoding(*(part[k : k + 1] for part in parts))


@dataclass
class PropagatedMasks:
    """One ``[SEG]``'s masks through N frames.

    ``masks``: low-res mask logits ``[N, h, w]`` (``NO_OBJECT_LOGIT`` on frames without the target);
    ``object_scores``: SAM 2's object-score logits ``[N]`` (> 0: present); ``iou_scores``: predicted IoU
    ``[N]``; ``key_frame``: the frame with the highest per-frame object score (where ``"memory"`` prompts);
    ``mode``: ``"per_frame"`` or ``"memory"``.
    """

    masks: torch.Tensor
    object_scores: torch.Tensor
    iou_scores: torch.Tensor
    key_frame: int
    mode: str

    @property
    def present(self) -> torch.Tensor:
        """``[N]`` bool: the frames on which the target is present (object score > 0)."""
        return self.object_scores > 0


def encode_frames(
    grounding: GroundingEncoder, pixel_values: torch.Tensor, frames_per_pass: int = 1
) -> list[FrameFeatures]:
    """SAM 2 features of ``[N, 3, S, S]`` frames, ``frames_per_pass`` at a time through the image encoder (one
    by default: a volume's activations never need to fit at once). Gradients flow when enabled."""
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"frames must be [N, 3, S, S] with N >= 1, got {tuple(pixel_values.shape)}")
    if frames_per_pass < 1:
        raise ValueError(f"frames_per_pass must be at least 1, got {frames_per_pass}")
    frames: list[FrameFeatures] = []
    for start in range(0, pixel_values.shape[0], frames_per_pass):
        out = grounding.get_image_features(pixel_values[start : start + frames_per_pass], return_dict=True)
        for b in range(out.fpn_hidden_states[-1].shape[1]):
            levels = [level[:, b : b + 1] for level in out.fpn_hidden_states]
            frames.append(FrameFeatures(levels, out.fpn_position_encoding[-1][:, b : b + 1]))
    return frames


def _maps(grounding: GroundingEncoder, frame: FrameFeatures) -> list[torch.Tensor]:
    """The frame's high-resolution feature maps as ``[1, C, h, w]`` (the mask decoder's skip inputs)."""
    sizes = grounding.backbone_feature_sizes[:-1]
    return [level.permute(1, 2, 0).reshape(1, -1, *size) for level, size in zip(frame.levels[:-1], sizes, strict=True)]


def _without_memory(grounding: GroundingEncoder, frame: FrameFeatures) -> torch.Tensor:
    """The frame's image embedding ``[1, C, h, w]`` with SAM 2's "no memory" embedding, as for a 2-D image."""
    lowest = frame.levels[-1] + grounding.no_memory_embedding
    return lowest.permute(1, 2, 0).reshape(1, -1, *grounding.backbone_feature_sizes[-1])


def decode_frame(
    grounding: GroundingEncoder,
    high_res: list[torch.Tensor],
    image_embedding: torch.Tensor,
    count: int,
    prompts: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    multimask_output: bool = True,
) -> FrameDecoding:
    """SAM 2's masks for ``count`` objects on one frame (``image_embedding`` ``[1, C, h, w]``, with or without
    memory). Each object gets SAM's "not a point" padding, then its ``[SEG]`` embedding (``prompts`` ``[K, D]``)
    and positive point (``points`` ``[K, 2]``, SAM input pixels, NaN for none) when given — as
    :meth:`GroundingEncoder.decode` prompts a 2-D image; without them, an unprompted frame as SAM 2 tracks it.
    """
    device, dtype = image_embedding.device, image_embedding.dtype
    coords = torch.zeros(1, count, 1, 2, device=device, dtype=dtype)
    labels = -torch.ones(1, count, 1, device=device, dtype=torch.int32)
    if points is not None:
        given = ~torch.isnan(points).any(dim=-1)
        coords[0, given, 0] = points[given].to(device=device, dtype=dtype)
        labels[0, given, 0] = 1
    sparse, dense = grounding.prompt_encoder(
        input_points=coords, input_labels=labels, input_boxes=None, input_masks=None
    )
    if prompts is not None:
        sparse = torch.cat([sparse, prompts.to(sparse.dtype).view(1, count, 1, -1)], dim=2)
    masks, iou, tokens, object_scores = grounding.mask_decoder(
        image_embeddings=image_embedding,
        image_positional_embeddings=grounding.get_image_wide_positional_embeddings().to(dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        high_resolution_features=high_res,
    )
    # masks [1, K, C, h, w], iou [1, K, C], tokens [1, K, C or 1, D], object_scores [1, K, 1]
    scores = object_scores[0, :, 0]
    masks = torch.where((scores > 0)[:, None, None, None], masks[0], NO_OBJECT_LOGIT)
    best = iou[0].argmax(dim=-1)
    rows = torch.arange(count, device=best.device)
    kept_token = tokens[0, rows, best] if tokens.shape[2] > 1 else tokens[0, :, 0]
    return FrameDecoding(masks[rows, best], iou[0, rows, best], scores, kept_token)


def _check_prompts(
    grounding: GroundingEncoder, frames: Sequence[FrameFeatures], prompts: torch.Tensor, points: torch.Tensor | None
) -> None:
    if len(frames) == 0:
        raise ValueError("no frames to segment: give at least one frame")
    if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] != grounding.prompt_dim:
        raise ValueError(
            f"[SEG] prompts must be [K, {grounding.prompt_dim}] with K >= 1 (the projected [SEG] embeddings), "
            f"got {tuple(prompts.shape)}"
        )
    if points is not None and tuple(points.shape) != (prompts.shape[0], 2):
        raise ValueError(f"points must be [K, 2] for {prompts.shape[0]} prompt(s), got {tuple(points.shape)}")


def _per_frame(
    grounding: GroundingEncoder,
    frames: Sequence[FrameFeatures],
    prompts: torch.Tensor,
    points: torch.Tensor | None,
    multimask_output: bool,
) -> list[FrameDecoding]:
    count = prompts.shape[0]
    return [
        decode_frame(
            grounding, _maps(grounding, f), _without_memory(grounding, f), count, prompts, points, multimask_output
        )
        for f in frames
    ]


def _collect(decoded: list[FrameDecoding], k: int, mode: str) -> PropagatedMasks:
    """Object ``k``'s per-frame decodings stacked over the frames."""
    scores = torch.stack([d.object_scores[k] for d in decoded])
    return PropagatedMasks(
        masks=torch.stack([d.masks[k] for d in decoded]),
        object_scores=scores,
        iou_scores=torch.stack([d.iou_scores[k] for d in decoded]),
        key_frame=int(scores.argmax()),
        mode=mode,
    )


def prompt_frames(
    grounding: GroundingEncoder,
    frames: Sequence[FrameFeatures],
    prompts: torch.Tensor,
    points: torch.Tensor | None = None,
    multimask_output: bool = True,
) -> list[PropagatedMasks]:
    """Per-frame prompting: every ``[SEG]`` prompt (``[K, D]``, with optional ``[K, 2]`` points) on every frame
    independently; one :class:`PropagatedMasks` per prompt, frames with a negative object score maskless."""
    _check_prompts(grounding, frames, prompts, points)
    decoded = _per_frame(grounding, frames, prompts, points, multimask_output)
    return [_collect(decoded, k, "per_frame") for k in range(prompts.shape[0])]


class SegPropagator(Sam2VideoModel):
    """SAM 2's memory modules on top of a :class:`GroundingEncoder`, whose other modules it shares.

    The registered parameters are the memory modules alone, under transformers' ``Sam2VideoModel`` names
    (``memory_attention.*``, ``memory_encoder.*``, ``object_pointer_proj.*``, ...); ``vision_encoder``,
    ``prompt_encoder``, ``mask_decoder``, ``shared_image_embedding`` and ``no_memory_embedding`` are the
    grounding encoder's. ``Sam2VideoModel.__init__`` is not run, because it would build a second image
    encoder, prompt encoder and mask decoder; the memory modules are built here as it builds them.
    """

    def __init__(self, config: Sam2VideoConfig, grounding: GroundingEncoder) -> None:
        super(Sam2VideoModel, self).__init__(config)  # PreTrainedModel's, not Sam2VideoModel's
        self._shared = (grounding,)  # a tuple: not registered, so its weights are not the propagator's
        self.num_feature_levels = config.vision_config.num_feature_levels
        self.backbone_feature_sizes = config.vision_config.backbone_feature_sizes
        self.hidden_dim = config.vision_config.fpn_hidden_size
        self.image_size = config.image_size
        self.mem_dim = config.memory_encoder_output_channels
        self.num_maskmem = config.num_maskmem
        self.memory_attention = Sam2VideoMemoryAttention(config)
        self.memory_encoder = Sam2VideoMemoryEncoder(config)
        self.no_memory_positional_encoding = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        self.memory_temporal_positional_encoding = nn.Parameter(torch.zeros(self.num_maskmem, 1, 1, self.mem_dim))
        self.no_object_pointer = nn.Parameter(torch.zeros(1, self.hidden_dim))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.object_pointer_proj = Sam2VideoFeedForward(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
        if config.enable_temporal_pos_encoding_for_object_pointers:
            self.temporal_positional_encoding_projection_layer = nn.Linear(self.hidden_dim, self.mem_dim)
        else:
            self.temporal_positional_encoding_projection_layer = nn.Identity()
        self.occlusion_spatial_embedding_parameter = None
        if config.enable_occlusion_spatial_embedding:
            self.occlusion_spatial_embedding_parameter = nn.Parameter(torch.zeros(1, self.mem_dim))
        self.post_init()

    # --- the grounding encoder's modules, shared -------------------------------------------------------
    @property
    def grounding(self) -> GroundingEncoder:
        return self._shared[0]

    @property
    def vision_encoder(self) -> nn.Module:
        return self.grounding.vision_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.grounding.prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.grounding.mask_decoder

    @property
    def shared_image_embedding(self) -> nn.Module:
        return self.grounding.shared_image_embedding

    @property
    def no_memory_embedding(self) -> nn.Parameter:
        return self.grounding.no_memory_embedding

    # --- propagation ---------------------------------------------------------------------------------------
    def propagate(
        self,
        frames: Sequence[FrameFeatures],
        prompts: torch.Tensor,
        points: torch.Tensor | None = None,
        mode: PropagationMode = "memory",
        multimask_output: bool = True,
    ) -> list[PropagatedMasks]:
        """One :class:`PropagatedMasks` per ``[SEG]`` prompt (``[K, D]``; ``points`` ``[K, 2]`` or None).

        Every prompt is first decoded on every frame (``"per_frame"`` stops there). With ``"memory"`` each
        object is then prompted on its key frame — the highest object score — and tracked from there to the
        last frame and back to the first through SAM 2's memory bank; an object whose best score is not
        positive is absent from every frame and nothing is tracked.
        """
        if mode not in PROPAGATION_MODES:
            raise ValueError(f"unknown propagation mode {mode!r}; choose one of {', '.join(PROPAGATION_MODES)}")
        _check_prompts(self.grounding, frames, prompts, points)
        decoded = _per_frame(self.grounding, frames, prompts, points, multimask_output)
        results = []
        for k in range(prompts.shape[0]):
            single = _collect(decoded, k, mode)
            if mode == "memory" and len(frames) > 1 and bool(single.object_scores[single.key_frame] > 0):
                single = self._track(frames, decoded[single.key_frame], k, single.key_frame, multimask_output)
            results.append(single)
        return results

    def _track(
        self, frames: Sequence[FrameFeatures], key: FrameDecoding, k: int, key_frame: int, multimask_output: bool
    ) -> PropagatedMasks:
        """Object ``k`` from its prompted key frame through the other frames, forward then backward."""
        lowest = frames[key_frame].levels[-1]
        session = Sam2VideoInferenceSession(
            inference_device=lowest.device, inference_state_device=lowest.device, dtype=lowest.dtype
        )
        obj = session.obj_id_to_idx(k)
        answers = {key_frame: key.select(k)}
        self._remember(session, obj, key_frame, frames[key_frame], answers[key_frame], prompted=True)
        for reverse, order in ((False, range(key_frame + 1, len(frames))), (True, range(key_frame - 1, -1, -1))):
            for t in order:
                conditioned = self._prepare_memory_conditioned_features(
                    inference_session=session,
                    frame_idx=t,
                    obj_idx=obj,
                    is_initial_conditioning_frame=False,
                    current_vision_features=frames[t].levels[-1],
                    current_vision_positional_embeddings=frames[t].position,
                    num_total_frames=len(frames),
                    track_in_reverse_time=reverse,
                )
                hr = _maps(self.grounding, frames[t])
                answers[t] = decode_frame(self.grounding, hr, conditioned, 1, multimask_output=multimask_output)
                self._remember(session, obj, t, frames[t], answers[t], prompted=False)
        ordered = [answers[t] for t in range(len(frames))]
        return PropagatedMasks(
            masks=torch.cat([a.masks for a in ordered]),
            object_scores=torch.cat([a.object_scores for a in ordered]),
            iou_scores=torch.cat([a.iou_scores for a in ordered]),
            key_frame=key_frame,
            mode="memory",
        )

    def _remember(
        self,
        session: Sam2VideoInferenceSession,
        obj: int,
        t: int,
        frame: FrameFeatures,
        answer: FrameDecoding,
        prompted: bool,
    ) -> None:
        """Store one object's frame in the memory bank: its object pointer and the memory encoder's features of
        its mask (binarised on a prompted frame, sigmoid on a tracked one, as SAM 2 does)."""
        score = answer.object_scores.view(1, 1, 1)
        present = (score[0] > 0).to(answer.tokens.dtype)
        pointer = self.object_pointer_proj(answer.tokens) * present + (1 - present) * self.no_object_pointer
        high_res = F.interpolate(
            answer.masks[:, None].float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        ).to(answer.masks.dtype)
        features, positions = self._encode_new_memory(frame.levels[-1], high_res, score, is_mask_from_pts=prompted)
        session.store_output(
            obj,
            t,
            output_value={
                "pred_masks": answer.masks[:, None],
                "object_pointer": pointer,
                "object_score_logits": score,
                "maskmem_features": features,
                "maskmem_pos_enc": positions,
            },
            is_conditioning_frame=prompted,
        )
