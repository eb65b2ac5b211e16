"""The CitrusV model: Qwen2.5-VL + SAM 2, joined by a ``[SEG]`` projector.

``mllm``              transformers ``Qwen2_5_VLForConditionalGeneration`` (vision encoder, aligner, LLM)
``grounding_encoder`` transformers SAM 2 (``GroundingEncoder``, a ``Sam2Model``)
``seg_projector``     Linear(h, h) -> ReLU -> Linear(h, d_sam) -> Dropout
``seg_point_head``    optional: where each ``[SEG]``'s target is, given to SAM 2 as a point prompt
``propagator``        optional: SAM 2's memory modules, which carry a ``[SEG]`` mask through a volume's or a
                      clip's frames; they share the grounding encoder's other modules (:mod:`.propagation`)

The last-layer hidden state at the position of each ``[SEG]`` token is projected, passed through HookGrad
and appended to SAM 2's sparse prompt; each ``[SEG]`` gives one mask, in order (:meth:`CitrusV.decode_masks`,
the one path from ``[SEG]`` states to masks that training, the predictor and the evaluator share).
Training-only auxiliary objectives (:mod:`citrus_v.objectives`) plug in through one interface: the forward
hands them the intermediate tensors they ask for and adds their weighted losses.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel, Qwen2_5_VLForConditionalGeneration
from transformers.utils import ModelOutput

from .. import objectives as objective_registry
from ..checkpoint_layout import (
    CheckpointError,
    is_upstream_layout,
    read_config_dict,
    resolve_model,
    stored_names,
    upstream_sam2_config,
    weight_files,
)
from ..objectives import Objective, ObjectiveInputs
from ..tokens import IGNORE_INDEX
from .checkpoint import check_weights
from .configuration_citrus_v import CitrusVConfig
from .frame_losses import MaskLossSettings, VideoLossSums, video_loss_sums
from .grounding import GroundingEncoder, SamImageFeatures
from .hook_grad import hook_grad
from .losses import best_candidates, dice_loss_sum, mask_bce_sum, presence_bce_each
from .point_head import PointHead, sample_prompt_points
from .propagation import SegPropagator, video_config
from .seg_projector import ResidualSegProjector, SegProjector, build_seg_projector
from .upstream_checkpoint import (
    MEMORY_PREFIX,
    ShardedTensors,
    citrus_config_from_upstream,
    read_unused,
    read_upstream_weights,
    save_unused,
    stored_dtype,
    upstream_memory_config,
)
from .video_segmentation import VideoBatch, VideoSegDecoding, decode_video_segs, route_video_segs

logger = logging.getLogger(__name__)


class SegTargetError(ValueError):
    """A ``[SEG]`` token that cannot be paired with an image or a ground-truth mask."""


@dataclass
class CitrusVOutput(ModelOutput):
    """Outputs of :meth:`CitrusV.forward`.

    ``pred_masks[i]`` holds sample ``i``'s low-resolution mask logits ``[K_i, h, w]``, one per ``[SEG]``
    token in order; ``iou_scores[i]`` the predicted IoU ``[K_i]`` of each.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mask_bce_loss: torch.Tensor | None = None
    mask_dice_loss: torch.Tensor | None = None
    mask_iou_loss: torch.Tensor | None = None
    # the training-only objectives' losses by log name (unweighted; see citrus_v.objectives)
    aux_losses: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_masks: list[torch.Tensor] | None = None
    iou_scores: list[torch.Tensor] | None = None
    seg_embeddings: list[torch.Tensor] | None = None
    # the point head's own guesses (SAM may have been given real points in training instead)
    predicted_points: list[torch.Tensor] | None = None
    last_hidden_state: torch.Tensor | None = None
    # volume and clip samples in training (see .video_segmentation and .frame_losses): the mask losses of their
    # [SEG]s on the frames that show the target, and SAM 2's presence loss over every [SEG] (images and videos)
    video_mask_bce_loss: torch.Tensor | None = None
    video_mask_dice_loss: torch.Tensor | None = None
    video_mask_iou_loss: torch.Tensor | None = None
    presence_loss: torch.Tensor | None = None
    # per video sample (None without [SEG]): mask logits [K_v, F, h, w] and object-score logits [K_v, F]
    pred_video_masks: list[torch.Tensor | None] | None = None
    video_object_scores: list[torch.Tensor | None] | None = None


@dataclass
class SegDecoding:
    """What :meth:`CitrusV.decode_masks` gives per sample, one entry per ``[SEG]`` in order.

    ``masks[i]`` low-res logits ``[K_i, h, w]``, ``scores[i]`` their predicted IoU ``[K_i]``, ``candidates[i]``
    all of SAM's candidates with their predicted IoU (``([K_i, C, h, w], [K_i, C])``; None without ``[SEG]``),
    ``embeddings[i]`` the projected prompts ``[K_i, d_sam]``, ``predicted_points[i]`` the point head's
    ``[K_i, 2]`` (None without a point head), ``object_scores[i]`` SAM 2's object-score logits ``[K_i]``.
    """

    masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    candidates: list[tuple[torch.Tensor, torch.Tensor] | None]
    embeddings: list[torch.Tensor]
    predicted_points: list[torch.Tensor] | None
    object_scores: list[torch.Tensor] | None = None


@dataclass
class SegLosses:
    """The segmentation losses of one forward pass (None: not computed): mask BCE, Dice and IoU-head loss of the
    images' ``[SEG]`` tokens, the same of the videos' (over the frames that show the target), and SAM 2's
    presence loss over both."""

    bce: torch.Tensor | None = None
    dice: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    video_bce: torch.Tensor | None = None
    video_dice: torch.Tensor | None = None
    video_iou: torch.Tensor | None = None
    presence: torch.Tensor | None = None


class CitrusVPreTrainedModel(PreTrainedModel):
    config_class = CitrusVConfig
    base_model_prefix = "citrus_v"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (SegProjector, ResidualSegProjector)):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        elif isinstance(module, PointHead):
            with torch.no_grad():
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        else:
            super()._init_weights(module)


class CitrusV(CitrusVPreTrainedModel):
    """A medical vision-language model that answers in text, boxes and ``[SEG]`` masks."""

    def __init__(self, config: CitrusVConfig) -> None:
        super().__init__(config)
        self.mllm = Qwen2_5_VLForConditionalGeneration(config.mllm_config())
        self.grounding_encoder = GroundingEncoder(config.sam2_config())
        self.seg_projector = build_seg_projector(
            config.text_config.hidden_size,
            self.grounding_encoder.prompt_dim,
            config.seg_projector_dropout,
            residual=config.use_res_seg_projector,
        )
        # the [SEG] point head (see point_head.py): (x, y) logits; not in upstream checkpoints
        self.seg_point_head = PointHead(config.text_config.hidden_size) if config.seg_point_head else None
        # training-only objectives the config weights, each with its head (if any) under its own name
        self.objectives: tuple[Objective, ...] = objective_registry.enabled(config)
        for objective in self.objectives:
            head = objective.build_head(config)
            if head is not None:
                self.add_module(objective.head_attribute, head)
        # SAM 2's memory modules, when the config asks for them (built last: the other parts' random
        # initialisation does not change with them)
        self.propagator: SegPropagator | None = None
        if config.sam2_memory_config is not None:
            memory = video_config(config.sam2_config(), config.sam2_memory_config)
            self.propagator = SegPropagator(memory, self.grounding_encoder)
        # an upstream checkpoint's video/memory tensors that no module holds, kept so that they can be written back
        self.upstream_unused_tensors: dict[str, torch.Tensor] = {}
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> CitrusV:
        """Load a local Citrus-V folder — ours, or the released upstream layout — checking its files first.

        Only local folders are read (nothing is downloaded); ``tiny-base`` names the shipped checkpoint. A
        folder that does not fit raises :class:`CheckpointError` naming the file and the fix. An upstream-layout
        folder (SAM 2 under ``grounding_encoder.sam2_model.`` in Meta's names) is renamed on the fly; its
        video/memory tensors load into SAM 2's memory modules (``model.propagator``), or, when transformers
        cannot hold them, are kept aside in ``model.upstream_unused_tensors``. The dtype stays as stored unless
        ``dtype`` is given.
        """
        path = resolve_model(pretrained_model_name_or_path)
        config_dict = read_config_dict(path)
        files = weight_files(path)
        if is_upstream_layout(files):
            return cls._from_upstream(path, config_dict, files, *args, **kwargs)
        config = kwargs.get("config")
        if config is None:
            try:
                config = CitrusVConfig.from_pretrained(path)
            except Exception as err:  # strict config validation raises several types
                raise CheckpointError(f"{path / 'config.json'}: {err}") from err
        with torch.device("meta"):
            skeleton = cls(config)
        # a training-only head (or the point head) switched on in the config of a checkpoint saved without
        # it starts fresh
        check_weights(
            skeleton, files, may_be_missing=(*objective_registry.head_prefixes(), "seg_point_head.", MEMORY_PREFIX)
        )
        kwargs["config"] = config
        model = super().from_pretrained(path, *args, **kwargs)
        model.upstream_unused_tensors = read_unused(path)
        if model.propagator is not None and not any(n.startswith(MEMORY_PREFIX) for n in stored_names(files)):
            logger.warning(
                "%s: config.json asks for SAM 2 memory modules (sam2_memory_config) but the weights hold none: "
                "they start from random weights, so memory propagation means nothing until they are trained",
                path,
            )
        return model

    @classmethod
    def _from_upstream(cls, path: Path, config_dict: dict, files: list[Path], *args, **kwargs) -> CitrusV:
        """Load a folder in the released upstream layout (see :mod:`citrus_v.modeling.upstream_checkpoint`)."""
        config = kwargs.pop("config", None)
        if config is None:
            try:
                headers = ShardedTensors(files)
                sam2_config = upstream_sam2_config(config_dict, headers, path)
                config = citrus_config_from_upstream(config_dict, sam2_config)
                config.sam2_memory_config = upstream_memory_config(headers, sam2_config, path)
            except CheckpointError:
                raise
            except Exception as err:  # strict config validation raises several types
                raise CheckpointError(f"{path / 'config.json'}: {err}") from err
        with torch.device("meta"):
            skeleton = cls(config)
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        del skeleton
        state_dict, unused = read_upstream_weights(files, expected)
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = stored_dtype(state_dict) or "auto"
        model = super().from_pretrained(None, *args, config=config, state_dict=state_dict, **kwargs)
        model.config.name_or_path = str(path)
        model.upstream_unused_tensors = unused
        return model

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """Save with the in-memory parameter names (``mllm.model.language_model.*``, as upstream stores them).

        transformers would otherwise rename the Qwen2.5-VL part to its legacy layout on save. Tensors set
        aside from an upstream checkpoint are saved next to the weights (``upstream_unused.safetensors``) so
        that ``citrus-v convert --to upstream`` can write them back.
        """
        kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_unused(self.upstream_unused_tensors, Path(save_directory))

    # --- helpers ---------------------------------------------------------------------------------------
    @property
    def seg_token_idx(self) -> int:
        if self.config.seg_token_idx is None:
            raise SegTargetError("config.seg_token_idx is not set: build the model with a tokenizer holding [SEG]")
        return int(self.config.seg_token_idx)

    @property
    def mask_size(self) -> tuple[int, int]:
        return self.grounding_encoder.mask_size

    def get_input_embeddings(self) -> nn.Module:
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_input_embeddings(value)

    def seg_states(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """The last-layer hidden state of every ``[SEG]`` token, per sample, in order (``[K_i, hidden]``)."""
        seg_positions = input_ids == self.seg_token_idx
        counts = seg_positions.sum(dim=1).tolist()
        return list(hidden_states[seg_positions].split(counts, dim=0))

    def seg_embeddings(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Projected prompt embeddings of every ``[SEG]`` token, per sample, in order (``[K_i, d_sam]``)."""
        return self._split_prompts(self.seg_states(input_ids, hidden_states))[0]

    def seg_prompts(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAM 2 prompts of ``[K, hidden]`` ``[SEG]`` hidden states: the projected embeddings ``[K, d_sam]``
        and, with ``config.seg_point_head``, the predicted points ``[K, 2]`` (x, y in SAM input pixels;
        else None)."""
        projected = hook_grad(self.seg_projector(hidden), self.config.hook_grad_factor)
        if self.seg_point_head is None:
            return projected, None
        fraction = hook_grad(self.seg_point_head(hidden), self.config.hook_grad_factor).float().sigmoid()
        # a fraction f of the side is SAM pixel f*S - 0.5 (the prompt encoder adds the half pixel back)
        return projected, (fraction * self.grounding_encoder.image_size - 0.5).to(projected.dtype)

    def decode_masks(
        self,
        seg_states: list[torch.Tensor],
        sam_pixel_values: torch.Tensor | None,
        sam_image_mask: torch.Tensor | None = None,
        seg_image_index: list[torch.Tensor] | None = None,
        gt_masks: list[torch.Tensor] | None = None,
        strict: bool = True,
    ) -> SegDecoding:
        """``[SEG]`` hidden states -> one SAM 2 mask each: the one path that training, the predictor and the
        evaluator share.

        ``seg_states`` holds per sample the ``[K_i, hidden]`` states of its ``[SEG]`` tokens. The states are
        projected (and, with a point head, located); SAM 2 decodes each on its sample's image (see
        :meth:`predict_masks` for ``sam_image_mask``, ``seg_image_index`` and ``strict``). In training with
        ``gt_masks`` a share of the prompts get a real point inside the target (``point_prompt_probability``),
        as SAM itself is trained; everywhere else SAM gets the point head's guess.
        """
        embeddings, predicted = self._split_prompts(seg_states)
        return self._decode_prompts(
            embeddings, predicted, sam_pixel_values, sam_image_mask, seg_image_index, gt_masks, strict
        )

    def _decode_prompts(
        self,
        embeddings: list[torch.Tensor],
        predicted: list[torch.Tensor] | None,
        sam_pixel_values: torch.Tensor | None,
        sam_image_mask: torch.Tensor | None,
        seg_image_index: list[torch.Tensor] | None,
        gt_masks: list[torch.Tensor] | None,
        strict: bool,
    ) -> SegDecoding:
        """:meth:`decode_masks` once the ``[SEG]`` states are projected (and located)."""
        masks, scores, candidates, object_scores = self._predict(
            embeddings,
            sam_pixel_values,
            sam_image_mask,
            strict=strict,
            seg_image_index=seg_image_index,
            seg_points=self._prompt_points(predicted, gt_masks),
        )
        return SegDecoding(masks, scores, candidates, embeddings, predicted, object_scores)

    def _split_prompts(
        self, seg_states: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """:meth:`seg_prompts` of every sample's states, split back per sample. All the batch's states go at
        once (the point head standardises them with batch statistics); a batch without ``[SEG]`` runs
        neither head, so no gradient hook waits on an empty tensor."""
        counts = [states.shape[0] for states in seg_states]
        if sum(counts) == 0:
            empty = seg_states[0].new_zeros(0, self.seg_projector.prompt_dim)
            no_points = [seg_states[0].new_zeros(0, 2) for _ in counts]
            return [empty for _ in counts], None if self.seg_point_head is None else no_points
        projected, points = self.seg_prompts(torch.cat(seg_states))
        return list(projected.split(counts)), None if points is None else list(points.split(counts))

    def _prompt_points(
        self, predicted: list[torch.Tensor] | None, gt_masks: list[torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        """The point SAM 2 gets with each ``[SEG]``: the head's guess (detached: it learns from its own loss),
        or in training, for a ``point_prompt_probability`` share of the masks, a real point in the target."""
        probability = self.config.point_prompt_probability
        if not (self.training and gt_masks is not None and probability > 0):
            return None if predicted is None else [guess.detach() for guess in predicted]
        size = self.grounding_encoder.image_size
        real = [sample_prompt_points(target, probability, size) for target in gt_masks]
        if predicted is None:
            return real
        return [
            torch.where(torch.isnan(point), guess.detach().to(point.dtype), point)
            for point, guess in zip(real, predicted, strict=True)
        ]

    def predict_masks(
        self,
        seg_embeddings: list[torch.Tensor],
        sam_pixel_values: torch.Tensor | None,
        sam_image_mask: torch.Tensor | None = None,
        strict: bool = True,
        seg_image_index: list[torch.Tensor] | None = None,
        seg_points: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Run SAM 2 once per image that has ``[SEG]`` tokens; one low-res mask per embedding.

        Returns per sample the chosen mask logits ``[K_i, h, w]``, their predicted IoU ``[K_i]`` and all of
        SAM's candidates with their predicted IoU (``([K_i, C, h, w], [K_i, C])``; None without ``[SEG]``).

        Each ``[SEG]`` of sample ``i`` uses ``sam_pixel_values[i]``, or — for packed rows holding several
        samples — ``sam_pixel_values[seg_image_index[i][k]]`` for its ``k``-th ``[SEG]``. A ``[SEG]`` with no
        image is an error when ``strict`` (training), otherwise a warning and no mask for it. ``seg_points``:
        per sample ``[K_i, 2]`` positive points in SAM input pixels (the point head's, or real ones in
        training), NaN where none.
        """
        masks, scores, candidates, _ = self._predict(
            seg_embeddings, sam_pixel_values, sam_image_mask, strict, seg_image_index, seg_points
        )
        return masks, scores, candidates

    def _predict(
        self,
        seg_embeddings: list[torch.Tensor],
        sam_pixel_values: torch.Tensor | None,
        sam_image_mask: torch.Tensor | None = None,
        strict: bool = True,
        seg_image_index: list[torch.Tensor] | None = None,
        seg_points: list[torch.Tensor] | None = None,
    ) -> tuple[
        list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor] | None], list[torch.Tensor]
    ]:
        """:meth:`predict_masks`, with SAM 2's object-score logits ``[K_i]`` per sample as well."""
        image_of = self._seg_images(seg_embeddings, sam_pixel_values, sam_image_mask, seg_image_index, strict)
        needed = sorted({int(j) for index in image_of if index is not None for j in index.tolist()})
        features = self.grounding_encoder.image_features(sam_pixel_values[needed]) if needed else None
        ref = seg_embeddings[0] if seg_embeddings else torch.zeros(0)
        masks, scores, candidates, object_scores = [], [], [], []
        for sample, (emb, index) in enumerate(zip(seg_embeddings, image_of, strict=True)):
            if index is None:
                masks.append(ref.new_zeros(0, *self.mask_size))
                scores.append(ref.new_zeros(0))
                candidates.append(None)
                object_scores.append(ref.new_zeros(0))
                continue
            points = None if seg_points is None else seg_points[sample]
            chosen, score, options, option_iou, presence = self._decode_sample(emb, index, needed, features, points)
            masks.append(chosen)
            scores.append(score)
            candidates.append((options, option_iou))
            object_scores.append(presence)
        return masks, scores, candidates, object_scores

    def _seg_images(
        self,
        seg_embeddings: list[torch.Tensor],
        sam_pixel_values: torch.Tensor | None,
        sam_image_mask: torch.Tensor | None,
        seg_image_index: list[torch.Tensor] | None,
        strict: bool,
    ) -> list[torch.Tensor | None]:
        """Per sample, the SAM image index of each of its ``[SEG]`` (None: no ``[SEG]``, or no image for it)."""
        num_images = 0 if sam_pixel_values is None else sam_pixel_values.shape[0]
        image_of: list[torch.Tensor | None] = []
        missing = []
        for i, emb in enumerate(seg_embeddings):
            count = emb.shape[0]
            if count == 0:
                image_of.append(None)
            elif seg_image_index is not None:
                index = seg_image_index[i].to(torch.long).cpu()
                if index.numel() != count or (count and (index.min() < 0 or index.max() >= num_images)):
                    raise SegTargetError(
                        f"sample {i}: seg_image_index has {index.numel()} entries for {count} [SEG] token(s) "
                        f"and {num_images} SAM image(s)"
                    )
                image_of.append(index)
            elif num_images and (sam_image_mask is None or bool(sam_image_mask[i])):
                image_of.append(torch.full((count,), i, dtype=torch.long))
            else:
                missing.append(i)
                image_of.append(None)
        if missing:
            message = (
                f"sample(s) {missing} contain [SEG] tokens but no image: a [SEG] mask needs the sample's "
                "first image (give the sample an image, or remove [SEG] from its text)"
            )
            if strict:
                raise SegTargetError(message)
            warnings.warn(message + "; no mask is returned for those tokens", stacklevel=4)
        return image_of

    def _decode_sample(
        self,
        emb: torch.Tensor,
        index: torch.Tensor,
        needed: list[int],
        features: SamImageFeatures,
        points: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample's ``[SEG]`` prompts decoded on their images, in ``[SEG]`` order: chosen logits, their
        predicted IoU, all candidates, the candidates' predicted IoU and SAM 2's object-score logits."""
        count = emb.shape[0]
        slots: list[list[torch.Tensor | None]] = [[None] * count for _ in range(5)]
        for image in sorted(set(index.tolist())):
            chosen = (index == image).nonzero()[:, 0]
            decoded = self.grounding_encoder.decode(
                features.select(needed.index(image)),
                emb[chosen],
                self.config.multimask_output,
                points=None if points is None else points[chosen],
            )
            parts = (decoded.logits, decoded.iou_scores, decoded.candidates, decoded.candidate_iou,
                     decoded.object_scores)  # fmt: skip
            for slot, k in enumerate(chosen.tolist()):
                for kind, values in enumerate(parts):
                    slots[kind][k] = values[slot]
        masks, scores, options, option_iou, presence = (torch.stack(kind) for kind in slots)
        return masks, scores, options, option_iou, presence

    # --- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        labels: torch.LongTensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        sam_image_mask: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
        seg_image_index: list[torch.Tensor] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        num_masks_in_batch: int | torch.Tensor | None = None,
        objective_targets: dict[str, Any] | None = None,
        label_logits_only: bool = False,
        sam_video_pixel_values: list[torch.Tensor | None] | None = None,
        gt_video_masks: list[torch.Tensor | None] | None = None,
        gt_video_present: list[torch.Tensor | None] | None = None,
        seg_video_index: list[torch.Tensor] | None = None,
        num_video_masks_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CitrusVOutput:
        """Language-model logits, one mask per ``[SEG]`` token, and the losses when targets are given.

        Args:
            input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, mm_token_type_ids:
                as for ``Qwen2_5_VLForConditionalGeneration``.
            labels: next-token targets (``-100`` ignored); gives the LM loss.
            sam_pixel_values: ``[B, 3, S, S]`` SAM 2 input of each sample's first image.
            sam_image_mask: ``[B]`` bool, which samples have an image (all when omitted).
            gt_masks: per sample ``[K_i, h, w]`` binary targets at the SAM low-res size, one per ``[SEG]``.
            seg_image_index: per packed row, the index into ``sam_pixel_values`` of each ``[SEG]``'s image.
            num_items_in_batch: number of label tokens in the accumulated batch (LM loss normaliser).
            num_masks_in_batch: number of masks in the accumulated batch (mask loss normaliser).
            objective_targets: the training-only objectives' targets by name, as the processor collates them.
            label_logits_only: with ``labels``, logits only where the next token is a target (``[N, vocab]``).
            sam_video_pixel_values, gt_video_masks, gt_video_present, seg_video_index, num_video_masks_in_batch:
                training on volumes and clips, see :class:`~.video_segmentation.VideoBatch`: the ``[SEG]`` tokens
                of a sample with 3-D masks prompt SAM 2 on its training frames (``config.train_propagation``).
        """
        targets = objective_targets or {}
        active = [o for o in self.objectives if o.enabled(self.config) and o.active(targets)]  # weights as now
        with self._watch(active) as seen:
            outputs = self.mllm.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                use_cache=False,
                **kwargs,
            )
        hidden_states = outputs.last_hidden_state
        logits, lm_loss = self._language_loss(hidden_states, labels, num_items_in_batch, label_logits_only)
        video = None if gt_video_masks is None else VideoBatch(
            sam_video_pixel_values, gt_video_masks, gt_video_present, seg_video_index, num_video_masks_in_batch
        )
        images = (sam_pixel_values, sam_image_mask, seg_image_index, gt_masks)
        decoded, videos = self._decode_segs(self.seg_states(input_ids, hidden_states), images, labels, video)
        losses = self._seg_losses(decoded, videos, gt_masks, num_masks_in_batch, video)
        image_tokens = self._image_tokens(seen, pixel_values, kwargs.get("pixel_values_videos"))
        shared = ObjectiveInputs(
            self, None, {}, image_tokens, image_grid_thw, decoded.predicted_points, gt_masks, num_masks_in_batch,
            video_seg_points=[None if v is None else v.points for v in videos] if videos else None,
            video_masks=None if video is None else list(video.masks),
            num_video_masks=None if video is None else video.num_masks,
        )
        aux = self._objective_losses(active, seen, targets, shared)
        return CitrusVOutput(
            loss=self._total_loss(logits, lm_loss, losses, active, aux),
            lm_loss=lm_loss,
            aux_losses={o.log_name: aux[o.name] for o in active if o.name in aux} or None,
            logits=logits,
            last_hidden_state=hidden_states,
            **self._seg_outputs(losses, decoded, videos),
        )

    @staticmethod
    def _seg_outputs(losses: SegLosses, decoded: SegDecoding, videos: list[VideoSegDecoding | None]) -> dict[str, Any]:
        """The :class:`CitrusVOutput` fields of the ``[SEG]`` tokens: masks and their losses, of images and, in
        training, of volumes and clips, and the presence loss."""
        return {
            "mask_bce_loss": losses.bce,
            "mask_dice_loss": losses.dice,
            "mask_iou_loss": losses.iou,
            "pred_masks": decoded.masks,
            "iou_scores": decoded.scores,
            "seg_embeddings": decoded.embeddings,
            "predicted_points": decoded.predicted_points,
            "video_mask_bce_loss": losses.video_bce,
            "video_mask_dice_loss": losses.video_dice,
            "video_mask_iou_loss": losses.video_iou,
            "presence_loss": losses.presence,
            "pred_video_masks": [None if v is None else v.logits for v in videos] if videos else None,
            "video_object_scores": [None if v is None else v.object_scores for v in videos] if videos else None,
        }

    def _decode_segs(
        self,
        seg_states: list[torch.Tensor],
        image_inputs: tuple[Any, ...],
        labels: torch.Tensor | None,
        video: VideoBatch | None,
    ) -> tuple[SegDecoding, list[VideoSegDecoding | None]]:
        """Every ``[SEG]`` of the batch decoded: on its image (``image_inputs``: ``sam_pixel_values``,
        ``sam_image_mask``, ``seg_image_index``, ``gt_masks``), or in training on its video sample's frames. A
        ``[SEG]`` without an image is an error in training (with ``labels`` or ``gt_masks``)."""
        strict = labels is not None or image_inputs[3] is not None
        if video is None:
            return self.decode_masks(seg_states, *image_inputs, strict=strict), []
        return self._decode_with_videos(seg_states, (*image_inputs, strict), video)

    def _seg_losses(
        self,
        decoded: SegDecoding,
        videos: list[VideoSegDecoding | None],
        gt_masks: list[torch.Tensor] | None,
        num_masks_in_batch: int | torch.Tensor | None,
        video: VideoBatch | None,
    ) -> SegLosses:
        """The mask losses of images and of videos, and SAM 2's presence loss (with ``gt_masks``, in training)."""
        losses = SegLosses()
        if gt_masks is not None:
            losses.bce, losses.dice, losses.iou = self._mask_loss_parts(decoded, gt_masks, num_masks_in_batch)
        sums = None
        if videos and video is not None:
            sums = video_loss_sums(videos, video.masks, video.present, self._mask_loss_settings())
            if sums is not None:
                losses.video_bce, losses.video_dice, losses.video_iou = self._video_losses(sums, video.num_masks)
        if gt_masks is not None and self.config.presence_loss_weight > 0:
            losses.presence = self._presence_loss(
                decoded, sums, num_masks_in_batch, None if video is None else video.num_masks
            )
        return losses

    @staticmethod
    def _image_tokens(
        seen: dict[str, Any], pixel_values: torch.Tensor | None, pixel_values_videos: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The merged image tokens the vision tower gave (for the objectives that read them); with videos it ran
        on the images first, then on the videos, whose tokens the objectives do not read."""
        captured = seen.get("image_tokens")
        if captured and pixel_values_videos is not None:
            captured = captured[:1] if pixel_values is not None else []
        return torch.cat(captured) if captured else None

    # --- volumes and clips in training ---------------------------------------------------------------------
    def _decode_with_videos(
        self, seg_states: list[torch.Tensor], image_inputs: tuple[Any, ...], video: VideoBatch
    ) -> tuple[SegDecoding, list[VideoSegDecoding | None]]:
        """The ``[SEG]`` tokens of a batch that holds samples with 3-D masks: those of images through
        :meth:`decode_masks`' path (``image_inputs``: its ``sam_pixel_values``, ``sam_image_mask``,
        ``seg_image_index``, ``gt_masks`` and ``strict``), those of videos on their SAM 2 training frames
        (:mod:`.video_segmentation`). The projector and point head see every ``[SEG]`` of the batch at once."""
        pixels = list(video.sam_pixel_values or [])
        routes = route_video_segs([states.shape[0] for states in seg_states], pixels, video.seg_index)
        embeddings, predicted = self._split_prompts(seg_states)

        def images_only(values: list[torch.Tensor]) -> list[torch.Tensor]:
            return [value[(route < 0).to(value.device)] for value, route in zip(values, routes, strict=True)]

        decoded = self._decode_prompts(
            images_only(embeddings), None if predicted is None else images_only(predicted), *image_inputs
        )
        videos: list[VideoSegDecoding | None] = []
        for sample, frames in enumerate(pixels):
            mine = [(route == sample).to(value.device) for value, route in zip(embeddings, routes, strict=True)]
            prompts = torch.cat([value[chosen] for value, chosen in zip(embeddings, mine, strict=True)])
            if frames is None or prompts.shape[0] == 0:
                videos.append(None)
                continue
            # the point head's guess, as inference gives every frame (real points are drawn on 2-D targets); it
            # learns from its own loss (the point objective), not through SAM 2
            points = None
            if predicted is not None:
                points = torch.cat([value[chosen] for value, chosen in zip(predicted, mine, strict=True)])
            decoding = decode_video_segs(
                self.grounding_encoder, self.propagator, frames, prompts, None if points is None else points.detach(),
                self.config.multimask_output, self.config.train_propagation,
            )
            decoding.points = points
            videos.append(decoding)
        return decoded, videos

    def _mask_loss_settings(self) -> MaskLossSettings:
        config = self.config
        return MaskLossSettings(
            config.mask_loss_weight, config.dice_loss_weight, config.dice_eps, config.multimask_min_loss
        )

    @staticmethod
    def _video_losses(
        sums: VideoLossSums, num_video_masks_in_batch: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The video samples' mask BCE, Dice and IoU-head loss, per 3-D mask of the accumulated batch."""
        count = num_video_masks_in_batch if num_video_masks_in_batch is not None else sums.masks
        count = torch.as_tensor(count, dtype=torch.float32, device=sums.bce.device).clamp(min=1)
        return sums.bce / count, sums.dice / count, None if sums.iou is None else sums.iou / count

    @staticmethod
    def _presence_loss(
        decoded: SegDecoding,
        video_sums: VideoLossSums | None,
        num_masks_in_batch: int | torch.Tensor | None,
        num_video_masks_in_batch: int | torch.Tensor | None,
    ) -> torch.Tensor | None:
        """SAM 2's presence loss per mask of the accumulated batch: each 2-D ``[SEG]``'s object score against
        "present" (its target is in its image), each 3-D one's averaged over its frames (see .frame_losses);
        None without any ``[SEG]``."""
        scores = [s for s in (decoded.object_scores or []) if s.shape[0]]
        flat = torch.cat(scores) if scores else None
        if flat is None and video_sums is None:
            return None
        images = 0 if flat is None else int(flat.shape[0])
        total = presence_bce_each(flat, torch.ones_like(flat)).sum() if flat is not None else 0.0
        if video_sums is not None:
            total = total + video_sums.presence
        image_count = num_masks_in_batch if num_masks_in_batch is not None else images
        video_count = num_video_masks_in_batch if num_video_masks_in_batch is not None else (
            video_sums.masks if video_sums is not None else 0
        )
        device = total.device
        count = torch.as_tensor(image_count, dtype=torch.float32, device=device) + torch.as_tensor(
            video_count, dtype=torch.float32, device=device
        )
        return total / count.clamp(min=1)

    @contextmanager
    def _watch(self, active: list[Objective]) -> Iterator[dict[str, Any]]:
        """Around the language model's forward: record the merged image tokens when an active objective
        needs them, and whatever each active objective captures itself (under its name)."""
        seen: dict[str, Any] = {}
        with ExitStack() as stack:
            if any(o.needs_image_tokens for o in active):
                tokens: list[torch.Tensor] = []
                seen["image_tokens"] = tokens
                handle = self.mllm.model.visual.register_forward_hook(
                    lambda module, args, out: tokens.append(out.pooler_output)
                )
                stack.callback(handle.remove)
            for objective in active:
                seen[objective.name] = stack.enter_context(objective.capture(self))
            yield seen

    def _language_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None,
        num_items_in_batch: int | torch.Tensor | None,
        label_logits_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM logits and the LM loss when labels are given.

        With ``label_logits_only`` the LM head runs only where the next token is a target, and those logits are
        returned as ``[N, vocab]``. Training needs nothing else, and prompt, image and padding positions are
        most of a sequence: with a 150k-token vocabulary the head is the largest matmul of a small model's
        step. The loss is the same.
        """
        if labels is None:
            return self.mllm.lm_head(hidden_states), None
        targets: dict[str, torch.Tensor | None] = {"labels": labels}
        if label_logits_only:
            # position t predicts token t+1, as in transformers' causal-LM loss
            shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
            logits = self.mllm.lm_head(hidden_states[rows, cols])
            targets = {"labels": None, "shift_labels": shifted[rows, cols]}
        else:
            logits = self.mllm.lm_head(hidden_states)
        loss = self.mllm.loss_function(
            logits=logits,
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            **targets,
        )
        return logits, loss

    def _mask_loss_parts(
        self, decoded: SegDecoding, gt_masks: list[torch.Tensor], num_masks_in_batch: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mask BCE and Dice, and with ``multimask_min_loss`` the IoU head's loss (None otherwise)."""
        iou_loss = None
        pred_masks = decoded.masks
        if self.config.multimask_min_loss:
            # SAM's own objective: train the best of the candidates, and the IoU head to rank them
            pred_masks, iou_loss = self._best_candidates(decoded.candidates, gt_masks, num_masks_in_batch)
        bce, dice = self._mask_losses(pred_masks, gt_masks, num_masks_in_batch)
        return bce, dice, iou_loss

    @staticmethod
    def _objective_losses(
        active: list[Objective], seen: dict[str, Any], targets: dict[str, Any], shared: ObjectiveInputs
    ) -> dict[str, torch.Tensor]:
        """Each active objective's (unweighted) loss by objective name; those with nothing to learn are left out."""
        losses = {}
        for objective in active:
            if objective.needs_image_tokens and shared.image_tokens is None:
                continue  # a batch without images has no image tokens to learn from
            inputs = replace(shared, targets=targets.get(objective.name), captured=seen.get(objective.name, {}))
            value = objective.loss(inputs)
            if value is not None:
                losses[objective.name] = value
        return losses

    def _total_loss(
        self,
        logits: torch.Tensor,
        lm_loss: torch.Tensor | None,
        seg: SegLosses,
        active: list[Objective],
        aux: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """The weighted sum of the losses there are; None when there are none."""
        if lm_loss is None and seg.bce is None and not aux and seg.video_bce is None and seg.presence is None:
            return None
        config = self.config
        loss = lm_loss if lm_loss is not None else logits.new_zeros(())
        if seg.bce is not None:
            loss = loss + config.mask_loss_weight * seg.bce + config.dice_loss_weight * seg.dice
        if seg.iou is not None:
            loss = loss + config.iou_loss_weight * seg.iou
        for objective in active:
            if objective.name in aux:
                loss = loss + objective.weight(config) * aux[objective.name]
        if seg.video_bce is not None:
            loss = loss + config.mask_loss_weight * seg.video_bce + config.dice_loss_weight * seg.video_dice
        if seg.video_iou is not None:
            loss = loss + config.iou_loss_weight * seg.video_iou
        if seg.presence is not None:
            loss = loss + config.presence_loss_weight * seg.presence
        return loss

    def _best_candidates(
        self,
        candidates: list[tuple[torch.Tensor, torch.Tensor] | None],
        gt_masks: list[torch.Tensor],
        num_masks_in_batch: int | torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per ``[SEG]``, the candidate with the lowest mask loss, and the IoU head's MSE against each
        candidate's real IoU (summed over masks / ``num_masks_in_batch``), as SAM is trained."""
        chosen: list[torch.Tensor] = []
        squared: list[torch.Tensor] = []
        for i, (pair, target) in enumerate(zip(candidates, gt_masks, strict=True)):
            if pair is None or pair[0].shape[0] == 0:
                chosen.append(target.new_zeros(0, *target.shape[-2:]))
                continue
            logits, predicted_iou = pair
            if logits.shape[0] != target.shape[0]:
                raise SegTargetError(
                    f"sample {i} has {logits.shape[0]} [SEG] token(s) but {target.shape[0]} ground-truth mask(s): "
                    "each [SEG] in the answer needs exactly one mask, in the same order"
                )
            best, error = best_candidates(
                logits, predicted_iou, target, self.config.mask_loss_weight, self.config.dice_loss_weight,
                self.config.dice_eps,
            )  # fmt: skip
            chosen.append(best)
            squared.append(error)
        if not squared:
            return chosen, None
        count = num_masks_in_batch if num_masks_in_batch is not None else sum(c.shape[0] for c in chosen)
        count = torch.as_tensor(count, dtype=torch.float32, device=squared[0].device).clamp(min=1)
        return chosen, torch.cat(squared).sum() / count

    def _mask_losses(
        self,
        pred_masks: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
        num_masks_in_batch: int | torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(gt_masks) != len(pred_masks):
            raise SegTargetError(f"gt_masks has {len(gt_masks)} entries for a batch of {len(pred_masks)} samples")
        preds, targets = [], []
        for i, (pred, target) in enumerate(zip(pred_masks, gt_masks, strict=True)):
            if pred.shape[0] != target.shape[0]:
                raise SegTargetError(
                    f"sample {i} has {pred.shape[0]} [SEG] token(s) but {target.shape[0]} ground-truth mask(s): "
                    "each [SEG] in the answer needs exactly one mask, in the same order"
                )
            if pred.shape[0] and tuple(target.shape[-2:]) != tuple(pred.shape[-2:]):
                raise SegTargetError(
                    f"sample {i}: mask targets are {tuple(target.shape[-2:])}, the model predicts "
                    f"{tuple(pred.shape[-2:])}; prepare targets with CitrusVProcessor"
                )
            preds.append(pred)
            targets.append(target.to(pred.device))
        pred_all = torch.cat(preds) if preds else None
        if pred_all is None or pred_all.shape[0] == 0:
            # keep the graph connected so DDP sees every parameter used (no [SEG] in this micro-batch)
            zero = sum(p.sum() for p in self.seg_projector.parameters()) * 0.0
            return zero, zero
        target_all = torch.cat(targets)
        count = num_masks_in_batch if num_masks_in_batch is not None else pred_all.shape[0]
        count = torch.as_tensor(count, dtype=torch.float32, device=pred_all.device).clamp(min=1)
        bce = mask_bce_sum(pred_all, target_all) / count
        dice = dice_loss_sum(pred_all, target_all, eps=self.config.dice_eps) / count
        return bce, dice


AutoModel.register(CitrusVConfig, CitrusV, exist_ok=True)
