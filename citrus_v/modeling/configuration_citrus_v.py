"""Configuration of the CitrusV model.

The configuration *is* a Qwen2.5-VL configuration (text fields, ``vision_config``, image/vision token ids)
with the Citrus-V fields added, exactly as the upstream ``config.json`` lays them out. That way an upstream
``config.json`` loads into this class unchanged, and ours stays readable by tools that know Qwen2.5-VL.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, Qwen2_5_VLConfig, Sam2Config

DEFAULT_MASK_LOSS_WEIGHT = 2.0
DEFAULT_DICE_LOSS_WEIGHT = 1.0
DEFAULT_DICE_EPS = 1.0
# How a [SEG]'s low-res mask logits become a mask of the original image (half of parity mode; the other half
# is the processor's ``sam_input``):
#   "upsample_logits"   upsample the logits bilinearly to the original size, then threshold: smooth edges.
#   "threshold_low_res" threshold the low-res logits, then resize the binary mask with nearest neighbour, as
#                       upstream Citrus-V's server and clients do: the masks the released weights were judged by.
MASK_POSTPROCESS = ("upsample_logits", "threshold_low_res")
DEFAULT_MASK_POSTPROCESS = "upsample_logits"
UPSTREAM_MASK_POSTPROCESS = "threshold_low_res"
# off by default, as upstream trains; a recipe that teaches "not present" (volumes, absent targets) turns it on
DEFAULT_PRESENCE_LOSS_WEIGHT = 0.0
# How the [SEG]s of volume and clip samples meet their training frames (see citrus_v.modeling.video_segmentation)
TRAIN_PROPAGATIONS = ("per_frame", "memory")


class CitrusVConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL configuration plus the segmentation head of Citrus-V.

    Args (besides Qwen2.5-VL's):
        seg_token_idx: id of the ``[SEG]`` token, read from the tokenizer when the model is built.
        grounding_encoder_config: the SAM 2 configuration as a dict (``Sam2Config.to_dict()``).
        seg_projector_dropout: dropout after the projector's last linear layer.
        use_res_seg_projector: upstream's residual projector variant (not built by our presets).
        loss_mask_config: ``{"loss_weight": w}`` for the sigmoid BCE mask loss (upstream default 2.0).
        loss_dice_config: ``{"loss_weight": w, "eps": e}`` for the Dice loss (upstream default 1.0, eps 1.0).
        hook_grad_factor: HookGrad factor on the projector output; 1.0 disables it, stage 3 uses 0.001.
        multimask_min_loss: train SAM as SAM itself is trained: the mask losses go to the best of its three
            candidate masks, and its IoU head learns each candidate's real IoU (weight ``iou_loss_weight``),
            so that inference's "keep the highest predicted IoU" picks a trained mask. Off (upstream: the
            loss goes to the candidate the IoU head picks, which is right for a pretrained SAM 2 whose IoU
            head already ranks well); on for random-init presets, whose IoU head ranks at random.
        iou_loss_weight: weight of that IoU-head MSE.
        multimask_output: SAM 2 gives three candidate masks and the one with the highest predicted IoU is kept
            (upstream, True); False uses SAM's single-mask output. A random-init SAM trained with three
            candidates specialises them, and a barely trained IoU head then picks the wrong one (a tiny
            model can have a good best candidate and an empty kept one); the tiny preset uses one.
        point_prompt_probability: in training, the chance that a mask's prompt gets one positive point drawn
            inside its target (in place of the point head's), next to the ``[SEG]`` embedding, as SAM itself
            is trained. 0.0 (upstream) for a pretrained SAM 2. A random-init SAM taught by language alone
            separates targets that look different but not those told apart only by position (left from
            right lung); points teach its decoder to select by position.
        mask_postprocess: how the predictor turns low-res mask logits into a mask of the original image,
            ``"upsample_logits"`` or ``"threshold_low_res"`` (see :data:`MASK_POSTPROCESS`); a released
            upstream checkpoint gets ``"threshold_low_res"``, as upstream does. Training is unaffected: the
            mask losses are computed on the low-res logits either way.
        seg_point_head: build a head on each ``[SEG]`` hidden state that predicts where its target is (the
            target's innermost pixel, see :mod:`.point_head`); SAM 2 gets that point as a positive point
            prompt next to the ``[SEG]`` embedding, in training and inference. Off (upstream); on in the tiny
            preset, whose random-init SAM otherwise cannot tell left from right lung.
        sam2_memory_config: SAM 2's memory modules (memory attention, memory encoder, object pointers), which
            carry a ``[SEG]`` mask through the frames of a volume or clip (:mod:`.propagation`): ``None`` (the
            default) builds none; a dict builds them, its keys any memory fields of transformers'
            ``Sam2VideoConfig`` (``{}``: SAM 2's memory architecture at the image encoder's width). A released
            upstream checkpoint gets the settings of the memory tensors it carries.
        propagation: how inference meets a volume's or clip's frames unless asked otherwise, ``"per_frame"`` or
            ``"memory"``; ``None`` (the default): memory when the model has the memory modules. A checkpoint
            whose own measurements favour one mode records it here (the tiny base: per frame).
        presence_loss_weight: weight of SAM 2's presence loss in training: the sigmoid BCE of its object-score
            logit (``pred_obj_score_head``, which decides on which frames of a volume a target is) against the
            truth, for every 2-D ``[SEG]`` (present) and every frame of a volume's or clip's ``[SEG]``; 0 (the
            default, as upstream trains) turns it off.
        train_propagation: how each ``[SEG]`` of a volume or clip sample meets its training frames:
            ``"per_frame"`` (each frame prompted on its own) or ``"memory"`` (SAM 2's memory carries the mask
            from the most certain frame, so the memory modules train; needs ``sam2_memory_config``).

    Training-only auxiliary objectives keep their own config keys (``*_loss_weight`` and the like, 0.0 or
    absent: off); each is documented in its file under :mod:`citrus_v.objectives`, which reads them from this
    configuration, so a saved ``config.json`` carries them as it always has.
    """

    model_type = "citrus_v"

    seg_token_idx: int | None = None
    grounding_encoder_config: dict | None = None
    seg_projector_dropout: float = 0.0
    use_res_seg_projector: bool = False
    loss_mask_config: dict | None = None
    loss_dice_config: dict | None = None
    hook_grad_factor: float = 1.0
    multimask_min_loss: bool = False
    iou_loss_weight: float = 1.0
    multimask_output: bool = True
    point_prompt_probability: float = 0.0
    seg_point_head: bool = False
    mask_postprocess: str = DEFAULT_MASK_POSTPROCESS
    sam2_memory_config: dict | None = None
    propagation: str | None = None
    presence_loss_weight: float = DEFAULT_PRESENCE_LOSS_WEIGHT
    train_propagation: str = "per_frame"

    # --- derived views -------------------------------------------------------------------------------
    def sam2_config(self) -> Sam2Config:
        """The SAM 2 configuration of the grounding encoder."""
        cfg = self.grounding_encoder_config
        if not cfg:
            raise ValueError("CitrusVConfig.grounding_encoder_config is empty: the SAM 2 configuration is required")
        if "vision_config" not in cfg:
            raise ValueError(
                "grounding_encoder_config has no SAM 2 'vision_config' "
                f"(keys: {sorted(cfg)}); upstream-format checkpoints are recognised by the checkpoint loader"
            )
        cfg = {k: v for k, v in cfg.items() if k != "model_type"}
        return Sam2Config(**cfg)

    def mllm_config(self) -> Qwen2_5_VLConfig:
        """A plain Qwen2.5-VL configuration for the ``mllm`` sub-model."""
        cfg = Qwen2_5_VLConfig(
            text_config=self.text_config.to_dict(),
            vision_config=self.vision_config.to_dict(),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        cfg._attn_implementation = self._attn_implementation
        return cfg

    @property
    def mask_loss_weight(self) -> float:
        return float((self.loss_mask_config or {}).get("loss_weight", DEFAULT_MASK_LOSS_WEIGHT))

    @property
    def dice_loss_weight(self) -> float:
        return float((self.loss_dice_config or {}).get("loss_weight", DEFAULT_DICE_LOSS_WEIGHT))

    @property
    def dice_eps(self) -> float:
        return float((self.loss_dice_config or {}).get("eps", DEFAULT_DICE_EPS))

    @classmethod
    def from_parts(
        cls,
        mllm_config: Qwen2_5_VLConfig,
        sam2_config: Sam2Config,
        seg_token_idx: int,
        **overrides: Any,
    ) -> CitrusVConfig:
        """Combine a Qwen2.5-VL configuration and a SAM 2 configuration into one CitrusV configuration."""
        fields = dict(
            text_config=mllm_config.text_config.to_dict(),
            vision_config=mllm_config.vision_config.to_dict(),
            image_token_id=mllm_config.image_token_id,
            video_token_id=mllm_config.video_token_id,
            vision_start_token_id=mllm_config.vision_start_token_id,
            vision_end_token_id=mllm_config.vision_end_token_id,
            tie_word_embeddings=mllm_config.tie_word_embeddings,
            seg_token_idx=seg_token_idx,
            grounding_encoder_config=sam2_config.to_dict(),
            loss_mask_config={"loss_weight": DEFAULT_MASK_LOSS_WEIGHT},
            loss_dice_config={"loss_weight": DEFAULT_DICE_LOSS_WEIGHT, "eps": DEFAULT_DICE_EPS},
            architectures=["CitrusV"],
        )
        fields.update(overrides)
        return cls(**fields)


# Known to the Auto classes, so AutoConfig/AutoTokenizer read our folders without a foreign-type warning.
AutoConfig.register(CitrusVConfig.model_type, CitrusVConfig, exist_ok=True)
