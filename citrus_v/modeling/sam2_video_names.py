"""SAM 2 memory-module names: Meta's original checkpoints <-> transformers' ``Sam2VideoModel``.

The single-image rules (:mod:`citrus_v.modeling.sam2_names`) return Meta's video/memory tensors apart
(:data:`~citrus_v.modeling.sam2_names.IGNORED_MODULES`: memory attention, memory encoder, object pointers,
temporal encodings). This module places them in transformers' ``Sam2VideoModel``, following transformers' own
conversion script (``models/sam2_video/convert_sam2_video_to_hf.py``), in one table of name templates read in
both directions (the placeholders of :func:`~citrus_v.modeling.sam2_names.compile_template`). Every rename is
one to one; Meta's mask downsampler numbers its conv/norm/activation triples ``encoder.{3k}``,
``encoder.{3k+1}`` (the activation has no tensors) and its last 1×1 conv ``encoder.12``, transformers names
them ``layers.{k}.conv``, ``layers.{k}.layer_norm`` and ``final_conv``.

:func:`memory_config_from_meta` reads the memory architecture from the tensor shapes (layer counts, widths,
SAM 2.0 or 2.1), as the configuration of the memory modules that hold them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .sam2_names import apply_rules, compile_template

# Meta's mask downsampler: four stride-2 conv/LayerNorm/GELU triples (total stride 16) and a 1x1 conv
MASK_DOWNSAMPLER_LAYERS = 4
_MEMORY_ATTENTIONS = ("self_attn", "cross_attn_image")
_ATTN = "memory_attention.layers.{i}."
_FUSER_META = "memory_encoder.fuser.layers.{i}."
_FUSER_HF = "memory_encoder.memory_fuser.layers.{i}."
_DOWNSAMPLER_META = "memory_encoder.mask_downsampler.encoder."
_DOWNSAMPLER_HF = "memory_encoder.mask_downsampler."

# (Meta name, transformers name); read top to bottom like the memory modules of SAM2Base.
MEMORY_RULES: tuple[tuple[str, str], ...] = (
    # memory attention: RoPE self-attention and cross-attention to the memories, feed-forward, norms
    *((f"{_ATTN}{attn}.{{qkv}}.{{p}}", f"{_ATTN}{attn}.{{qkv}}.{{p}}") for attn in _MEMORY_ATTENTIONS),
    *((f"{_ATTN}{attn}.out_proj.{{p}}", f"{_ATTN}{attn}.o_proj.{{p}}") for attn in _MEMORY_ATTENTIONS),
    (_ATTN + "linear1.{p}", _ATTN + "linear1.{p}"),
    (_ATTN + "linear2.{p}", _ATTN + "linear2.{p}"),
    (_ATTN + "norm{n}.{p}", _ATTN + "layer_norm{n}.{p}"),
    ("memory_attention.norm.{p}", "memory_attention.layer_norm.{p}"),
    # memory encoder: mask downsampler, pixel-feature projection, ConvNeXt fuser, output projection
    *(
        (f"{_DOWNSAMPLER_META}{3 * k + offset}.{{p}}", f"{_DOWNSAMPLER_HF}layers.{k}.{part}.{{p}}")
        for k in range(MASK_DOWNSAMPLER_LAYERS)
        for offset, part in ((0, "conv"), (1, "layer_norm"))
    ),
    (f"{_DOWNSAMPLER_META}{3 * MASK_DOWNSAMPLER_LAYERS}.{{p}}", _DOWNSAMPLER_HF + "final_conv.{p}"),
    ("memory_encoder.pix_feat_proj.{p}", "memory_encoder.feature_projection.{p}"),
    (_FUSER_META + "dwconv.{p}", _FUSER_HF + "depthwise_conv.{p}"),
    (_FUSER_META + "norm.{p}", _FUSER_HF + "layer_norm.{p}"),
    (_FUSER_META + "pwconv1.{p}", _FUSER_HF + "pointwise_conv1.{p}"),
    (_FUSER_META + "pwconv2.{p}", _FUSER_HF + "pointwise_conv2.{p}"),
    (_FUSER_META + "gamma", _FUSER_HF + "scale"),
    ("memory_encoder.out_proj.{p}", "memory_encoder.projection.{p}"),
    # temporal encodings and "no memory" / "no object" embeddings
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    # object pointers: mask-prompt downsampling, the three-layer MLP on SAM's output token, temporal projection
    ("mask_downsample.{p}", "mask_downsample.{p}"),
    *(
        (f"obj_ptr_proj.layers.{k}.{{p}}", f"object_pointer_proj.{new}.{{p}}")
        for k, new in ((0, "proj_in"), (1, "layers.0"), (2, "proj_out"))
    ),
    # SAM 2.1 only
    ("obj_ptr_tpos_proj.{p}", "temporal_positional_encoding_projection_layer.{p}"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
)

_FORWARD = tuple((compile_template(meta), hf) for meta, hf in MEMORY_RULES)
_BACKWARD = tuple((compile_template(hf), meta) for meta, hf in MEMORY_RULES)

# transformers' memory attention reads memories this wide (its cross-attention key width is fixed)
TRANSFORMERS_MEMORY_WIDTH = 64


class MemoryLayoutError(ValueError):
    """SAM 2 memory tensors that no rule places, or that transformers' ``Sam2VideoModel`` cannot hold."""


def meta_to_hf_memory_name(meta_name: str) -> str | None:
    """The ``Sam2VideoModel`` name of a Meta memory tensor (``None`` when no rule covers it)."""
    return apply_rules(meta_name, _FORWARD)


def hf_to_meta_memory_name(hf_name: str) -> str | None:
    """The Meta name of a ``Sam2VideoModel`` memory tensor (``None`` when no rule covers it)."""
    return apply_rules(hf_name, _BACKWARD)


def _rename(tensors: Mapping[str, Any], rename, direction: str) -> dict[str, Any]:
    renamed: dict[str, Any] = {}
    unknown: list[str] = []
    for name in tensors:
        target = rename(name)
        if target is None:
            unknown.append(name)
        else:
            renamed[target] = tensors[name]
    if unknown:
        raise MemoryLayoutError(
            f"{len(unknown)} SAM 2 memory tensor name(s) have no {direction} name: {', '.join(sorted(unknown)[:8])}"
        )
    return renamed


def meta_to_hf_memory(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Meta memory tensors (no prefix) to ``Sam2VideoModel`` names; each tensor is read once, on access.

    Raises :class:`MemoryLayoutError` naming every tensor no rule covers."""
    return _rename(tensors, meta_to_hf_memory_name, "Sam2VideoModel")


def hf_to_meta_memory(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``Sam2VideoModel`` memory tensors back to Meta's names (the inverse of :func:`meta_to_hf_memory`)."""
    return _rename(tensors, hf_to_meta_memory_name, "original SAM 2")


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({m.group(1) for name in shapes if (m := compiled.fullmatch(name))})


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise MemoryLayoutError(f"the SAM 2 memory tensors lack {name}")
    return tuple(shapes[name])


def memory_config_from_meta(shapes: Mapping[str, tuple[int, ...]], fpn_width: int) -> dict[str, Any]:
    """The memory settings (``Sam2VideoConfig`` fields) of Meta memory tensors, read from their shapes.

    ``shapes`` holds the memory tensors by Meta name (no prefix); ``fpn_width`` is the image encoder's feature
    width, which the memory attention shares. Raises :class:`MemoryLayoutError` saying why when the tensors
    are incomplete or of a shape transformers' ``Sam2VideoModel`` does not build.
    """
    memory_width = _shape(shapes, "maskmem_tpos_enc")[-1]
    width = _shape(shapes, "no_mem_pos_enc")[-1]
    if width != fpn_width:
        raise MemoryLayoutError(f"the memory modules are {width} wide but the image features {fpn_width}")
    if memory_width != TRANSFORMERS_MEMORY_WIDTH:
        raise MemoryLayoutError(
            f"the memories are {memory_width} channels wide; transformers' Sam2VideoModel reads "
            f"{TRANSFORMERS_MEMORY_WIDTH} (every released SAM 2 has {TRANSFORMERS_MEMORY_WIDTH})"
        )
    fuser = "memory_encoder.fuser.layers.0."
    kernel = _shape(shapes, fuser + "dwconv.weight")[-1]
    return {
        "num_maskmem": _shape(shapes, "maskmem_tpos_enc")[0],
        "memory_attention_num_layers": _count(shapes, r"memory_attention\.layers\.(\d+)\..*"),
        "memory_attention_feed_forward_hidden_size": _shape(shapes, "memory_attention.layers.0.linear1.weight")[0],
        "memory_encoder_output_channels": memory_width,
        "memory_fuser_num_layers": _count(shapes, r"memory_encoder\.fuser\.layers\.(\d+)\..*"),
        "memory_fuser_intermediate_dim": _shape(shapes, fuser + "pwconv1.weight")[0],
        "memory_fuser_kernel_size": kernel,
        "memory_fuser_padding": kernel // 2,
        "enable_temporal_pos_encoding_for_object_pointers": "obj_ptr_tpos_proj.weight" in shapes,
        "enable_occlusion_spatial_embedding": "no_obj_embed_spatial" in shapes,
    }
