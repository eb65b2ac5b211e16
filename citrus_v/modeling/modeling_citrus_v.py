"""The CitrusV model: Qwen2.5-VL + SAM 2, joined by a ``[SEG]`` projector.

``mllm``              transformers ``Qwen2_5_VLForConditionalGeneration`` (vision encoder, aligner, LLM)
``grounding_encoder`` transformers SAM 2 (``GroundingEncoder``, a ``Sam2Model``)
``seg_projector``     Linear(h, h) -> ReLU -> Linear(h, d_sam) -> Dropout

The last-layer hidden state at the position of each ``[SEG]`` token is projected, passed through HookGrad
and appended to SAM 2's sparse prompt; each ``[SEG]`` gives one mask, in order.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel, Qwen2_5_VLForConditionalGeneration
from transformers.utils import ModelOutput

from ..processing.template import IGNORE_INDEX
from .checkpoint import CheckpointError, check_weights, read_config_dict, weight_files
from .configuration_citrus_v import CitrusVConfig
from .copy_attention import capture_attention_input, copy_attention_loss
from .grounding import GroundingEncoder, SamImageFeatures
from .hook_grad import hook_grad
from .lesion_count import LesionCountHead
from .lesion_map import LesionMapHead
from .losses import dice_loss_each, dice_loss_sum, mask_bce_each, mask_bce_sum
from .point_head import PointHead, interior_points, point_loss
from .seg_projector import ResidualSegProjector, SegProjector, build_seg_projector
from .text_map import TextMapHead
from .upstream_checkpoint import (
    TRAINING_ONLY,
    UNUSED_ATTRIBUTE,
    ShardedTensors,
    citrus_config_from_upstream,
    is_upstream_layout,
    read_unused,
    read_upstream_weights,
    save_unused,
    stored_dtype,
    upstream_sam2_config,
)


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
    lesion_map_loss: torch.Tensor | None = None
    lesion_count_loss: torch.Tensor | None = None
    point_loss: torch.Tensor | None = None
    text_map_loss: torch.Tensor | None = None
    copy_attention_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pred_masks: list[torch.Tensor] | None = None
    iou_scores: list[torch.Tensor] | None = None
    seg_embeddings: list[torch.Tensor] | None = None
    # the point head's own guesses (SAM may have been given real points instead: predict_masks(seg_points=...))
    predicted_points: list[torch.Tensor] | None = None
    last_hidden_state: torch.Tensor | None = None


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
        # training-only: built when the config gives the auxiliary loss a weight
        self.lesion_map_head = (
            LesionMapHead(config.vision_config.out_hidden_size) if config.lesion_map_loss_weight > 0 else None
        )
        merge = int(config.vision_config.spatial_merge_size)
        self.text_map_head = (
            TextMapHead(config.vision_config.out_hidden_size, merge * merge)
            if config.text_map_loss_weight > 0
            else None
        )
        self.lesion_count_head = (
            LesionCountHead(config.vision_config.out_hidden_size) if config.lesion_count_loss_weight > 0 else None
        )
        self.post_init()

    def _copy_attention(self) -> nn.Module:
        """The language-model attention module the copy-attention loss supervises."""
        layers = self.mllm.model.language_model.layers
        index = self.config.copy_attention_layer
        if not -len(layers) <= index < len(layers):
            raise ValueError(f"copy_attention_layer is {index} but the language model has {len(layers)} layers")
        heads = self.config.text_config.num_attention_heads
        if not 0 <= self.config.copy_attention_head < heads:
            raise ValueError(f"copy_attention_head is {self.config.copy_attention_head} but layers have {heads} heads")
        return layers[index].self_attn

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> CitrusV:
        """Load a local Citrus-V folder — ours, or the released upstream layout — checking its files first.

        Only local folders are read (nothing is downloaded). A folder that does not fit raises
        :class:`CheckpointError` naming the file and the fix. An upstream-layout folder (SAM 2 under
        ``grounding_encoder.sam2_model.`` in Meta's names) is renamed on the fly; its video/memory tensors are
        kept aside on the model (``upstream_unused_tensors``). The dtype stays as stored unless ``dtype`` is given.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is not a folder: Citrus-V loads local model folders only. Fix: give the folder "
                "written by `citrus-v build` or `save_pretrained`"
            )
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
        check_weights(skeleton, files, may_be_missing=(*TRAINING_ONLY, "seg_point_head."))
        kwargs["config"] = config
        model = super().from_pretrained(path, *args, **kwargs)
        setattr(model, UNUSED_ATTRIBUTE, read_unused(path))
        return model

    @classmethod
    def _from_upstream(cls, path: Path, config_dict: dict, files: list[Path], *args, **kwargs) -> CitrusV:
        """Load a folder in the released upstream layout (see :mod:`citrus_v.modeling.upstream_checkpoint`)."""
        config = kwargs.pop("config", None)
        if config is None:
            try:
                sam2_config = upstream_sam2_config(config_dict, ShardedTensors(files), path)
                config = citrus_config_from_upstream(config_dict, sam2_config)
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
        setattr(model, UNUSED_ATTRIBUTE, unused)
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
            save_unused(getattr(self, UNUSED_ATTRIBUTE, None) or {}, Path(save_directory))

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

    def seg_embeddings(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Projected prompt embeddings of every ``[SEG]`` token, per sample, in order (``[K_i, d_sam]``)."""
        return self._seg_prompts(input_ids, hidden_states)[0]

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

    def _seg_prompts(
        self, input_ids: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``seg_prompts`` of every ``[SEG]`` token, split per sample in order."""
        seg_positions = input_ids == self.seg_token_idx
        counts = seg_positions.sum(dim=1).tolist()
        if sum(counts) == 0:
            empty = hidden_states.new_zeros(0, self.seg_projector.prompt_dim)
            no_points = [hidden_states.new_zeros(0, 2) for _ in counts]
            return [empty for _ in counts], None if self.seg_point_head is None else no_points
        projected, points = self.seg_prompts(hidden_states[seg_positions])
        split = list(projected.split(counts, dim=0))
        return split, None if points is None else list(points.split(counts, dim=0))

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
        height, width = self.mask_size
        ref = seg_embeddings[0] if seg_embeddings else None
        masks: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        candidates: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        num_images = 0 if sam_pixel_values is None else sam_pixel_values.shape[0]
        image_of: list[torch.Tensor | None] = []  # per sample: the SAM image index of each [SEG]
        missing = []
        for i, emb in enumerate(seg_embeddings):
            count = emb.shape[0]
            if count == 0:
                image_of.append(None)
                continue
            if seg_image_index is not None:
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
            warnings.warn(message + "; no mask is returned for those tokens", stacklevel=2)
        needed = sorted({int(j) for index in image_of if index is not None for j in index.tolist()})
        features: SamImageFeatures | None = None
        if needed:
            features = self.grounding_encoder.image_features(sam_pixel_values[needed])
        for sample, (emb, index) in enumerate(zip(seg_embeddings, image_of, strict=True)):
            if index is None:
                masks.append(ref.new_zeros(0, height, width) if ref is not None else torch.zeros(0, height, width))
                scores.append(ref.new_zeros(0) if ref is not None else torch.zeros(0))
                candidates.append(None)
                continue
            row_masks: list[torch.Tensor | None] = [None] * emb.shape[0]
            row_scores: list[torch.Tensor | None] = [None] * emb.shape[0]
            row_candidates: list[torch.Tensor | None] = [None] * emb.shape[0]
            row_candidate_iou: list[torch.Tensor | None] = [None] * emb.shape[0]
            for image in sorted(set(index.tolist())):
                chosen = (index == image).nonzero()[:, 0]
                decoded = self.grounding_encoder.decode(
                    features.select(needed.index(image)),
                    emb[chosen],
                    self.config.multimask_output,
                    points=None if seg_points is None else seg_points[sample][chosen],
                )
                for slot, k in enumerate(chosen.tolist()):
                    row_masks[k] = decoded.logits[slot]
                    row_scores[k] = decoded.iou_scores[slot]
                    row_candidates[k] = decoded.candidates[slot]
                    row_candidate_iou[k] = decoded.candidate_iou[slot]
            masks.append(torch.stack(row_masks))
            scores.append(torch.stack(row_scores))
            candidates.append((torch.stack(row_candidates), torch.stack(row_candidate_iou)))
        return masks, scores, candidates

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
        lesion_map_targets: torch.Tensor | None = None,
        lesion_count_targets: torch.Tensor | None = None,
        text_map_targets: torch.Tensor | None = None,
        copy_offsets: torch.Tensor | None = None,
        label_logits_only: bool = False,
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
            lesion_map_targets: ``[N]`` per merged image token 1/0 (lesion or not) or -1 (no map); gives the
                training-only lesion-map loss when the config weights it (ignored otherwise).
            lesion_count_targets: ``[N]`` per merged image token the number of lesion centres in its cell, or -1
                (none given); gives the training-only lesion-count loss when the config weights it.
            text_map_targets: ``[N, merge*merge]`` per merged image token the character class of each patch, or
                -1 (no map); gives the training-only text-map loss when the config weights it.
            copy_offsets: ``[B, L]`` per position the distance back to the image token its next token is read
                from (0: none); gives the training-only copy-attention loss when the config weights it.
            label_logits_only: with ``labels``, run the LM head only where the next token is a target and
                return those logits as ``[N, vocab]``. Training needs nothing else, and prompt, image and
                padding positions are most of a sequence: with a 150k-token vocabulary the head is the
                largest matmul of a small model's step. The loss is the same.
        """
        use_lesion_map = self.lesion_map_head is not None and lesion_map_targets is not None
        use_lesion_count = self.lesion_count_head is not None and lesion_count_targets is not None
        use_text_map = self.text_map_head is not None and text_map_targets is not None
        image_tokens: list[torch.Tensor] = []
        handle = (
            self.mllm.model.visual.register_forward_hook(lambda m, a, out: image_tokens.append(out.pooler_output))
            if use_lesion_map or use_lesion_count or use_text_map
            else None
        )
        use_copy = copy_offsets is not None and self.config.copy_attention_loss_weight > 0
        copy_attention = self._copy_attention() if use_copy else None
        try:
            with capture_attention_input(copy_attention) if use_copy else nullcontext({}) as seen:
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
        finally:
            if handle is not None:
                handle.remove()
        copy_loss = None
        if use_copy and seen:
            copy_loss = copy_attention_loss(copy_attention, seen, copy_offsets, self.config.copy_attention_head)
        hidden_states = outputs.last_hidden_state
        targets: dict[str, torch.Tensor | None] = {"labels": labels}
        if labels is not None and label_logits_only:
            # position t predicts token t+1, as in transformers' causal-LM loss
            shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
            logits = self.mllm.lm_head(hidden_states[rows, cols])
            targets = {"labels": None, "shift_labels": shifted[rows, cols]}
        else:
            logits = self.mllm.lm_head(hidden_states)
        lm_loss = None
        if labels is not None:
            lm_loss = self.mllm.loss_function(
                logits=logits,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                **targets,
            )

        seg_embeddings, predicted_points = self._seg_prompts(input_ids, hidden_states)
        training_targets = labels is not None or gt_masks is not None
        seg_points = predicted_points
        if self.training and gt_masks is not None and self.config.point_prompt_probability > 0:
            seg_points = [self._sample_points(target) for target in gt_masks]
            if predicted_points is not None:
                # a real point where one was drawn, the head's (detached: it learns from point_loss) elsewhere
                seg_points = [
                    torch.where(torch.isnan(real), guess.detach().to(real.dtype), real)
                    for real, guess in zip(seg_points, predicted_points, strict=True)
                ]
        elif seg_points is not None:
            seg_points = [guess.detach() for guess in seg_points]
        pred_masks, iou_scores, candidates = self.predict_masks(
            seg_embeddings,
            sam_pixel_values,
            sam_image_mask,
            strict=training_targets,
            seg_image_index=seg_image_index,
            seg_points=seg_points,
        )

        bce = dice = iou_loss = None
        if gt_masks is not None:
            if self.config.multimask_min_loss:
                # SAM's own objective: train the best of the candidates, and the IoU head to rank them
                pred_masks_for_loss, iou_loss = self._best_candidates(candidates, gt_masks, num_masks_in_batch)
            else:
                pred_masks_for_loss = pred_masks
            bce, dice = self._mask_losses(pred_masks_for_loss, gt_masks, num_masks_in_batch)
        located = None
        if predicted_points is not None and gt_masks is not None:
            located = self._point_loss(predicted_points, gt_masks, num_masks_in_batch)

        lesion_loss = None
        if use_lesion_map and image_tokens:
            lesion_loss = self.lesion_map_head.loss(torch.cat(image_tokens), lesion_map_targets)
        count_loss = None
        if use_lesion_count and image_tokens:
            merge = int(self.config.vision_config.spatial_merge_size) ** 2
            per_image = [int(n) // merge for n in image_grid_thw.prod(dim=-1).tolist()]
            count_loss = self.lesion_count_head.loss(torch.cat(image_tokens), lesion_count_targets, per_image)
        text_loss = None
        if use_text_map and image_tokens:
            text_loss = self.text_map_head.loss(torch.cat(image_tokens), text_map_targets)

        loss = None
        parts = (lm_loss, bce, lesion_loss, count_loss, text_loss, located, copy_loss)
        if any(part is not None for part in parts):
            loss = lm_loss if lm_loss is not None else logits.new_zeros(())
            if bce is not None:
                loss = loss + self.config.mask_loss_weight * bce + self.config.dice_loss_weight * dice
            if iou_loss is not None:
                loss = loss + self.config.iou_loss_weight * iou_loss
            if lesion_loss is not None:
                loss = loss + self.config.lesion_map_loss_weight * lesion_loss
            if count_loss is not None:
                loss = loss + self.config.lesion_count_loss_weight * count_loss
            if text_loss is not None:
                loss = loss + self.config.text_map_loss_weight * text_loss
            if located is not None:
                loss = loss + self.config.point_loss_weight * located
            if copy_loss is not None:
                loss = loss + self.config.copy_attention_loss_weight * copy_loss

        return CitrusVOutput(
            loss=loss,
            lm_loss=lm_loss,
            mask_bce_loss=bce,
            mask_dice_loss=dice,
            mask_iou_loss=iou_loss,
            lesion_map_loss=lesion_loss,
            lesion_count_loss=count_loss,
            point_loss=located,
            text_map_loss=text_loss,
            copy_attention_loss=copy_loss,
            logits=logits,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
            seg_embeddings=seg_embeddings,
            predicted_points=predicted_points,
            last_hidden_state=hidden_states,
        )

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
            target = target.to(logits.device).float()
            with torch.no_grad():
                flat = logits.float().flatten(2)  # [K, C, hw]
                goal = target.flatten(1)[:, None, :].expand_as(flat)
                pairs, goals = flat.flatten(0, 1), goal.flatten(0, 1)  # one row per (mask, candidate)
                cost = self.config.mask_loss_weight * mask_bce_each(pairs, goals)
                cost = cost + self.config.dice_loss_weight * dice_loss_each(pairs, goals, self.config.dice_eps)
                best = cost.view(flat.shape[:2]).argmin(dim=1)
                hard = flat > 0
                inter = (hard & (goal > 0.5)).sum(-1).float()
                union = (hard | (goal > 0.5)).sum(-1).float()
                real_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            chosen.append(logits[torch.arange(logits.shape[0], device=logits.device), best])
            squared.append(((predicted_iou.float() - real_iou) ** 2).mean(1))
        if not squared:
            return chosen, None
        count = num_masks_in_batch if num_masks_in_batch is not None else sum(c.shape[0] for c in chosen)
        count = torch.as_tensor(count, dtype=torch.float32, device=squared[0].device).clamp(min=1)
        return chosen, torch.cat(squared).sum() / count

    def _point_loss(
        self,
        predicted_points: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
        num_masks_in_batch: int | torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The point head's L1 distance to each target's innermost pixel, both as fractions of the side."""
        points = torch.cat(predicted_points)
        if points.shape[0] == 0:
            return None
        masks = torch.cat([m.to(points.device) for m in gt_masks])
        if masks.shape[0] != points.shape[0]:
            raise SegTargetError(f"{masks.shape[0]} ground-truth mask(s) for {points.shape[0]} [SEG] token(s)")
        size = self.grounding_encoder.image_size
        with torch.no_grad():
            target = (interior_points(masks) + 0.5) / masks.shape[-1]
        count = num_masks_in_batch if num_masks_in_batch is not None else points.shape[0]
        return point_loss((points + 0.5) / size, target, count)

    def _to_sam_pixels(self, xy: torch.Tensor, mask_width: int) -> torch.Tensor:
        """Low-res mask pixel indices (x, y) -> the SAM input pixel index of the pixel's centre (the prompt
        encoder adds the 0.5)."""
        scale = self.grounding_encoder.image_size / mask_width
        return (xy + 0.5) * scale - 0.5

    def _sample_points(self, target: torch.Tensor) -> torch.Tensor:
        """One positive point per mask of ``target`` ``[K, h, w]`` with probability
        ``point_prompt_probability``, uniform over the mask's pixels, in SAM input pixels ``[K, 2]`` (x, y);
        NaN for masks left without a point (and for empty masks)."""
        points = torch.full((target.shape[0], 2), float("nan"), device=target.device)
        if target.shape[0] == 0:
            return points
        width = target.shape[-1]
        flat = (target.reshape(target.shape[0], -1) > 0.5).float()
        chosen = (torch.rand(target.shape[0], device=target.device) < self.config.point_prompt_probability)
        chosen &= flat.sum(dim=1) > 0
        if chosen.any():
            pixel = torch.multinomial(flat[chosen], 1)[:, 0]
            xy = torch.stack([pixel % width, pixel // width], dim=1).to(points.dtype)
            points[chosen] = self._to_sam_pixels(xy, width)
        return points

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
