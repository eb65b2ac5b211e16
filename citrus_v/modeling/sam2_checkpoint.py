"""Meta's original SAM 2 checkpoints (``sam2_hiera_large.pt``, ``sam2.1_hiera_large.pt``) as a ``GroundingEncoder``.

The ``.pt`` file holds ``{"model": state_dict}`` in Meta's names. The architecture comes from the file name or,
failing that, from the tensor shapes (:mod:`citrus_v.checkpoint_layout.sam2_variants`); the names go through
the same rules as the upstream checkpoint (:mod:`citrus_v.modeling.sam2_names`). Video/memory tensors are returned
apart, so that a model built from them can write them back in the upstream layout.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch

from ..checkpoint_layout import META_PREFIX, CheckpointError
from ..checkpoint_layout.sam2_variants import Sam2VariantError, resolve_variant
from .grounding import GroundingEncoder
from .sam2_names import Sam2NameError, hf_to_meta_name, meta_to_hf
from .upstream_checkpoint import stored_dtype

logger = logging.getLogger(__name__)

ORIGINAL_SUFFIXES = (".pt", ".pth")


def read_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Meta SAM 2 ``.pt`` file, memory-mapped (weights only, nothing executed)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({err}). Fix: give Meta's SAM 2 .pt file "
            "(e.g. sam2_hiera_large.pt) or a transformers SAM 2 folder"
        ) from err
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path}: expected Meta's SAM 2 layout {{'model': state_dict}}, found {keys}. Fix: give the "
            "original .pt file from the SAM 2 release"
        )
    return state


def load_original_sam2(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[GroundingEncoder, dict[str, torch.Tensor]]:
    """Build a ``GroundingEncoder`` from Meta's original SAM 2 ``.pt`` file (SAM 2.0 or 2.1).

    Returns the encoder and the video/memory tensors it does not use, under their upstream names
    (``grounding_encoder.sam2_model.*``). The dtype stays as stored unless ``dtype`` is given.
    """
    path = Path(path)
    state = read_original_state_dict(path)
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    try:
        variant = resolve_variant([path.name], shapes, str(path))
        renamed, ignored = meta_to_hf(state)
    except (Sam2VariantError, Sam2NameError) as err:
        raise CheckpointError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from err
    config = variant.config()
    with torch.device("meta"):
        skeleton = GroundingEncoder(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    missing = sorted(hf_to_meta_name(n) or n for n in set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    wrong = [
        f"{n} {list(renamed[n].shape)} (expected {list(expected[n])})"
        for n in expected
        if n in renamed and tuple(renamed[n].shape) != expected[n]
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not fit SAM 2 {variant.name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes {wrong[:5]}. Fix: give an unmodified SAM 2 release file"
        )
    encoder = GroundingEncoder.from_pretrained(
        None, config=config, state_dict=renamed, dtype=dtype or stored_dtype(renamed) or "auto"
    )
    logger.info("loaded %s as %s; set aside %d video/memory tensors", path, variant.name, len(ignored))
    return encoder, {META_PREFIX + name: tensor for name, tensor in ignored.items()}
