"""Assemble a CitrusV model from local Qwen2.5-VL and SAM 2 checkpoints (the 8B recipe: Qwen2.5-VL-7B +
SAM 2 Hiera-L), add the ``[SEG]`` token, and save model and processor to one folder.

SAM 2 comes either as a transformers folder or as Meta's original ``.pt`` file (SAM 2.0 or 2.1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .checkpoint_layout import CheckpointError
from .modeling.configuration_citrus_v import CitrusVConfig
from .modeling.grounding import GroundingEncoder
from .modeling.modeling_citrus_v import CitrusV
from .modeling.sam2_checkpoint import ORIGINAL_SUFFIXES, load_original_sam2
from .modeling.seg_projector import SegProjector
from .processing.processor import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, CitrusVProcessor
from .processing.tokenizer_builder import add_citrus_tokens
from .tokens import SEG_TOKEN

logger = logging.getLogger(__name__)


def _require_folder(path: Path, what: str, files: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: give a local {what} checkpoint folder")
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing: {path} is not a complete {what} checkpoint folder")


def _load_sam2(sam2: Path, dtype: torch.dtype | None) -> tuple[GroundingEncoder, dict[str, torch.Tensor]]:
    """A transformers SAM 2 folder, or Meta's original ``.pt`` file (with its unused video tensors)."""
    if sam2.is_file():
        if sam2.suffix not in ORIGINAL_SUFFIXES:
            raise CheckpointError(
                f"{sam2} is a file but not a .pt checkpoint: give Meta's SAM 2 .pt file "
                "(e.g. sam2_hiera_large.pt) or a transformers SAM 2 folder"
            )
        return load_original_sam2(sam2, dtype)
    if not sam2.exists():
        raise CheckpointError(f"{sam2} does not exist: give a transformers SAM 2 folder or Meta's SAM 2 .pt file")
    _require_folder(sam2, "SAM 2", ("config.json",))
    return GroundingEncoder.from_pretrained(sam2, dtype=dtype), {}


def assemble(
    mllm_dir: str | Path,
    sam2_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> tuple[CitrusV, CitrusVProcessor]:
    """Build a CitrusV from a Qwen2.5-VL folder and SAM 2 (a transformers folder or Meta's ``.pt`` file).

    The tokenizer of ``mllm_dir`` gets ``[SEG]``, ``<bbox>``, ``</bbox>`` where missing; the embedding is
    resized only when the tokenizer outgrows it (Qwen2.5-VL-7B's 152064 rows already have room). SAM 2's
    video/memory tensors from a ``.pt`` file are kept aside for ``citrus-v convert --to upstream``.
    """
    mllm_dir, sam2_dir = Path(mllm_dir), Path(sam2_dir)
    _require_folder(mllm_dir, "Qwen2.5-VL", ("config.json",))
    tokenizer = AutoTokenizer.from_pretrained(mllm_dir)
    added = add_citrus_tokens(tokenizer)
    if added:
        logger.info("added %s to the tokenizer of %s", ", ".join(added), mllm_dir)

    mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(mllm_dir, dtype=dtype)
    sam, unused = _load_sam2(sam2_dir, dtype)
    rows = mllm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        mllm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        logger.info("resized the embedding from %d to %d rows", rows, mllm.get_input_embeddings().weight.shape[0])

    config = CitrusVConfig.from_parts(mllm.config, sam.config, seg_token_idx=tokenizer.convert_tokens_to_ids(SEG_TOKEN))
    with torch.device("meta"):
        model = CitrusV(config)
    model.mllm = mllm
    model.grounding_encoder = sam
    projector_dtype = next(mllm.parameters()).dtype
    model.seg_projector = SegProjector(config.text_config.hidden_size, sam.prompt_dim, config.seg_projector_dropout).to(
        projector_dtype
    )
    model.config.dtype = projector_dtype
    model.upstream_unused_tensors = unused

    if (mllm_dir / "preprocessor_config.json").is_file():
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(mllm_dir)
    else:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS)
    processor = CitrusVProcessor(tokenizer, image_processor, sam_image_size=sam.image_size, mask_size=sam.mask_size[0])
    return model, processor


def build_from_checkpoints(mllm_dir: str | Path, sam2_dir: str | Path, out: str | Path) -> Path:
    """Assemble and save to ``out``."""
    model, processor = assemble(mllm_dir, sam2_dir)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
