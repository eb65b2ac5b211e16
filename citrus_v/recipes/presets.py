"""Model presets. ``tiny``: a few million parameters that build in seconds and train on a CPU.

The tiny language model uses ``rope_theta=10``: with head size 32 and mrope sections [4, 6, 6], a large
theta leaves the image-column axis only the slowest rotary frequencies, and the model cannot tell image
columns apart (boxes collapse to the mean). The model stays a stock Qwen2.5-VL; only the value differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Sam2Config
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .. import objectives
from ..media.frame_sampling import VideoSampling
from ..modeling.configuration_citrus_v import CitrusVConfig
from ..modeling.grounding import reinit_fan_in
from ..modeling.modeling_citrus_v import CitrusV
from ..processing.processor import CitrusVProcessor
from ..processing.tokenizer_builder import build_tokenizer
from ..tokens import ENDOFTEXT, IM_END, IMAGE_PAD, SEG_TOKEN, VIDEO_PAD, VISION_END, VISION_START

PRESETS = ("tiny",)

# Tiny image bounds: 224×224 inputs give 16×16 patches -> 64 merged image tokens.
TINY_PIXELS = 224 * 224
# lab reports are 896 x 224 slips, one character per merged token (citrus_v.data.documents): 4x a scan
TINY_MAX_PIXELS = 4 * TINY_PIXELS
# SAM 2's memory modules at the tiny image encoder's width, two memory-attention layers (SAM 2 has four)
TINY_MEMORY: dict[str, int] = {"memory_attention_num_layers": 2}
# what the tiny language model sees of a volume or clip (ms-swift's video knobs, lower case): up to 16 frames of
# 112 x 112 pixels, 16 merged tokens per pair of frames, so a whole volume costs 128 tokens (a scan costs 64)
TINY_VIDEO: dict[str, int] = {"video_min_pixels": 112 * 112, "video_max_pixels": 112 * 112, "fps_max_frames": 16}


def tiny_sam2_config() -> Sam2Config:
    """A 0.5M-parameter SAM 2 on 256-pixel inputs (64×64 low-res masks).

    The first block of a pooling stage must not be a global-attention block, the FPN width equals the
    mask decoder width, and the feature sizes match the real maps.
    """
    return Sam2Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                hidden_size=32,
                num_attention_heads=1,
                image_size=[256, 256],
                patch_kernel_size=[7, 7],
                patch_stride=[4, 4],
                patch_padding=[3, 3],
                query_stride=[2, 2],
                window_positional_embedding_background_size=[7, 7],
                num_query_pool_stages=2,
                blocks_per_stage=[1, 1, 2],
                embed_dim_per_stage=[32, 64, 128],
                num_attention_heads_per_stage=[1, 2, 4],
                window_size_per_stage=[8, 4, 8],
                global_attention_blocks=[3],
                mlp_ratio=2.0,
            ),
            backbone_channel_list=[128, 64, 32],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=64,
            fpn_top_down_levels=[1, 2],
            num_feature_levels=3,
        ),
        prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16),
        mask_decoder_config=dict(
            hidden_size=64,
            mlp_dim=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            iou_head_hidden_dim=64,
            dynamic_multimask_via_stability=False,
        ),
    )


def tiny_mllm_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """A 4-layer, 128-wide Qwen2.5-VL with a 4-block, 96-wide vision tower; token ids from ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = (len(tokenizer) + 63) // 64 * 64  # rows rounded up, as Qwen pads its embedding
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
            rope_theta=10.0,
            bos_token_id=ids(ENDOFTEXT),
            eos_token_id=ids(IM_END),
            pad_token_id=ids(ENDOFTEXT),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=96,
            intermediate_size=192,
            num_heads=4,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[3],
        ),
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=False,
    )


def tiny_image_processor(patch_size: int = 14, merge_size: int = 2) -> Qwen2VLImageProcessorPil:
    """The tiny preset's image processor: 224-pixel images (64 merged tokens), up to four times that.

    ``patch_size`` and ``merge_size`` must be the vision tower's ``patch_size`` and ``spatial_merge_size``."""
    return Qwen2VLImageProcessorPil(
        min_pixels=TINY_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=patch_size, merge_size=merge_size
    )


def build_tiny(seed: int = 0, video: bool = True) -> tuple[CitrusV, CitrusVProcessor]:
    """A random-init tiny CitrusV and its processor (offline tokenizer, 224-pixel images, SAM at 256), with SAM
    2's memory modules and the tiny video settings (:data:`TINY_MEMORY`, :data:`TINY_VIDEO`); ``video=False``
    leaves both out (no memory modules, qwen_vl_utils' video settings), as a model without them is built."""
    # the seed draws the weights; the caller's random state is left as it was (no process-wide reseeding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        sam2_config = tiny_sam2_config()
        config = CitrusVConfig.from_parts(
            tiny_mllm_config(tokenizer),
            sam2_config,
            seg_token_idx=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
            # every training-only objective found in citrus_v/objectives: a tiny model ignores the image, and
            # does not learn to count or to read, without them (each file says why)
            **objectives.preset_config(),
            # SAM 2 is random here: one mask per prompt, and its IoU head trained to score it
            # (see CitrusVConfig.multimask_output and multimask_min_loss)
            multimask_output=False,
            multimask_min_loss=True,
            # nor can a random SAM tell targets apart by position from words alone (left from right lung): it
            # learns points as SAM does, and each [SEG] gives it one (see CitrusVConfig.point_prompt_probability
            # and citrus_v.modeling.point_head)
            point_prompt_probability=0.5,
            seg_point_head=True,
            # SAM 2's memory modules, so that a [SEG] about a volume or clip propagates through its frames
            sam2_memory_config=dict(TINY_MEMORY) if video else None,
        )
        model = CitrusV(config)
        sam = model.grounding_encoder
        reinit_fan_in(sam)  # random-init SAM needs fan-in init, or masks never learn
        if model.propagator is not None:
            reinit_fan_in(model.propagator)
        # SAM 2 has one random positional matrix shared by the prompt and image encodings (Meta stores it once);
        # transformers draws two, so tie them as the original model does (also keeps the preset exportable)
        with torch.no_grad():
            sam.prompt_encoder.shared_embedding.positional_embedding.copy_(sam.shared_image_embedding.positional_embedding)
    model.eval()
    processor = CitrusVProcessor(
        tokenizer,
        tiny_image_processor(),
        sam_image_size=sam2_config.prompt_encoder_config.image_size,
        mask_size=model.mask_size[0],
        video_sampling=VideoSampling(**TINY_VIDEO) if video else VideoSampling(),
    )
    return model, processor


def has_memory_modules(checkpoint: str | Path) -> bool:
    """Whether the CitrusV checkpoint folder ``checkpoint`` has SAM 2's memory modules (its config says so)."""
    return CitrusVConfig.from_pretrained(checkpoint).sam2_memory_config is not None


def add_memory_modules(source: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Copy the checkpoint ``source`` to ``out`` with the tiny preset's SAM 2 memory modules (random, fan-in
    initialised) and video settings added, every other weight as it was: how a base trained before the
    preset had them gains them."""
    config = CitrusVConfig.from_pretrained(source)
    config.sam2_memory_config = dict(TINY_MEMORY)
    model = CitrusV.from_pretrained(source, config=config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reinit_fan_in(model.propagator)
    processor = CitrusVProcessor.from_pretrained(source, video_sampling=VideoSampling(**TINY_VIDEO))
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_preset(name: str, out: str | Path, seed: int = 0) -> Path:
    """Build preset ``name`` and save model and processor to ``out``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    model, processor = build_tiny(seed=seed)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
