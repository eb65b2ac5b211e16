"""SAM 2 parameter names: Meta's original checkpoints <-> transformers' ``Sam2Model``.

One table of name templates serves both directions. A template holds placeholders that match the same text
on both sides: ``{i}`` a block or layer index, ``{p}`` ``weight`` or ``bias``, ``{n}`` a norm number,
``{qkv}`` ``q_proj``/``k_proj``/``v_proj``, ``{attn}`` one of the mask decoder's attention modules.
Two tensors need more than a rename:

- ``sam_prompt_encoder.point_embeddings.{0..3}.weight`` (four ``[1, D]`` embeddings) are concatenated on
  dim 0 into ``prompt_encoder.point_embed.weight`` ``[4, D]``;
- ``sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` becomes both
  ``prompt_encoder.shared_embedding.positional_embedding`` and ``shared_image_embedding.positional_embedding``
  (transformers keeps two copies of the one matrix).

Meta's video/memory modules have no place in a single-image SAM 2 and are returned apart by the documented
:data:`IGNORED_MODULES` list (transformers' ``Sam2Model`` has none of them); their names in transformers'
``Sam2VideoModel`` are :mod:`citrus_v.modeling.sam2_video_names`. Any other name that no rule covers is an
error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Top-level modules of Meta's SAM2Base used only for video (memory bank, object pointers):
# SAM 2.0 and 2.1 (the last two are SAM 2.1 additions).
IGNORED_MODULES: tuple[str, ...] = (
    "memory_attention",
    "memory_encoder",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "mask_downsample",
    "obj_ptr_proj",
    "no_obj_ptr",
    "obj_ptr_tpos_proj",
    "no_obj_embed_spatial",
)

POINT_EMBEDDINGS = "sam_prompt_encoder.point_embeddings.{k}.weight"
POINT_EMBED = "prompt_encoder.point_embed.weight"
GAUSSIAN_MATRIX = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
POSITIONAL_COPIES = (
    "prompt_encoder.shared_embedding.positional_embedding",
    "shared_image_embedding.positional_embedding",
)

_PLACEHOLDERS = {
    "i": r"\d+",
    "p": r"weight|bias",
    "n": r"[1-4]",
    "qkv": r"q_proj|k_proj|v_proj",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
}

_TRUNK = "image_encoder.trunk."
_BACKBONE = "vision_encoder.backbone."
_TWO_WAY = "mask_decoder.transformer."
_DECODER_MLPS = ("output_hypernetworks_mlps.{i}", "iou_prediction_head", "pred_obj_score_head")

# (Meta name, transformers name); read top to bottom like the modules of SAM2Base.
RULES: tuple[tuple[str, str], ...] = (
    # image encoder: Hiera trunk
    (_TRUNK + "pos_embed", _BACKBONE + "pos_embed"),
    (_TRUNK + "pos_embed_window", _BACKBONE + "pos_embed_window"),
    (_TRUNK + "patch_embed.proj.{p}", _BACKBONE + "patch_embed.projection.{p}"),
    (_TRUNK + "blocks.{i}.norm{n}.{p}", _BACKBONE + "blocks.{i}.layer_norm{n}.{p}"),
    (_TRUNK + "blocks.{i}.attn.qkv.{p}", _BACKBONE + "blocks.{i}.attn.qkv.{p}"),
    (_TRUNK + "blocks.{i}.attn.proj.{p}", _BACKBONE + "blocks.{i}.attn.proj.{p}"),
    (_TRUNK + "blocks.{i}.mlp.layers.0.{p}", _BACKBONE + "blocks.{i}.mlp.proj_in.{p}"),
    (_TRUNK + "blocks.{i}.mlp.layers.1.{p}", _BACKBONE + "blocks.{i}.mlp.proj_out.{p}"),
    (_TRUNK + "blocks.{i}.proj.{p}", _BACKBONE + "blocks.{i}.proj.{p}"),  # width change at a stage start
    # image encoder: FPN neck
    ("image_encoder.neck.convs.{i}.conv.{p}", "vision_encoder.neck.convs.{i}.{p}"),
    # prompt encoder
    ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("sam_prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("sam_prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    # mask decoder: two-way transformer
    (
        "sam_mask_decoder.transformer.layers.{i}.{attn}.{qkv}.{p}",
        "mask_decoder.transformer.layers.{i}.{attn}.{qkv}.{p}",
    ),
    (
        "sam_mask_decoder.transformer.layers.{i}.{attn}.out_proj.{p}",
        "mask_decoder.transformer.layers.{i}.{attn}.o_proj.{p}",
    ),
    ("sam_mask_decoder.transformer.layers.{i}.norm{n}.{p}", "mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}"),
    ("sam_mask_decoder.transformer.layers.{i}.mlp.layers.0.{p}", _TWO_WAY + "layers.{i}.mlp.proj_in.{p}"),
    ("sam_mask_decoder.transformer.layers.{i}.mlp.layers.1.{p}", _TWO_WAY + "layers.{i}.mlp.proj_out.{p}"),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.{qkv}.{p}",
        "mask_decoder.transformer.final_attn_token_to_image.{qkv}.{p}",
    ),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.{p}",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.{p}",
    ),
    ("sam_mask_decoder.transformer.norm_final_attn.{p}", "mask_decoder.transformer.layer_norm_final_attn.{p}"),
    # mask decoder: tokens, upscaling, high-resolution convs
    ("sam_mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("sam_mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    ("sam_mask_decoder.obj_score_token.weight", "mask_decoder.obj_score_token.weight"),
    ("sam_mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("sam_mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("sam_mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("sam_mask_decoder.conv_s0.{p}", "mask_decoder.conv_s0.{p}"),
    ("sam_mask_decoder.conv_s1.{p}", "mask_decoder.conv_s1.{p}"),
    # mask decoder: three-layer MLP heads (layers 0/1/2 -> proj_in / layers.0 / proj_out)
    *(
        (f"sam_mask_decoder.{head}.layers.{k}.{{p}}", f"mask_decoder.{head}.{new}.{{p}}")
        for head in _DECODER_MLPS
        for k, new in ((0, "proj_in"), (1, "layers.0"), (2, "proj_out"))
    ),
    # single-image use of the memory path: "no memory" embedding added to the lowest-resolution features
    ("no_mem_embed", "no_memory_embedding"),
)


class Sam2NameError(ValueError):
    """SAM 2 tensors that the rename rules cannot place, or that a model needs and a checkpoint lacks."""


def compile_template(template: str) -> re.Pattern[str]:
    """A name template (placeholders ``{i}``, ``{p}``, ``{n}``, ``{qkv}``, ``{attn}``) as a regular expression."""
    pattern = re.escape(template)
    for key, alternatives in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>{alternatives})")
    return re.compile(pattern)


_FORWARD = tuple((compile_template(meta), hf) for meta, hf in RULES)
_BACKWARD = tuple((compile_template(hf), meta) for meta, hf in RULES)
_POINT_PATTERN = compile_template(POINT_EMBEDDINGS.replace("{k}", "{i}"))


def apply_rules(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    """The target of the first rule whose pattern matches all of ``name`` (``None`` when none does)."""
    for pattern, target in table:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def is_ignored(meta_name: str) -> bool:
    """Whether a Meta SAM 2 tensor belongs to the video/memory modules set aside for single images."""
    return meta_name.split(".", 1)[0] in IGNORED_MODULES


def meta_to_hf_name(meta_name: str) -> str | None:
    """The transformers name of a one-to-one Meta tensor name (``None`` when no rule covers it)."""
    return apply_rules(meta_name, _FORWARD)


def hf_to_meta_name(hf_name: str) -> str | None:
    """The Meta name of a one-to-one transformers tensor name (``None`` when no rule covers it)."""
    if hf_name == POINT_EMBED:
        return POINT_EMBEDDINGS.format(k="0..3")
    if hf_name in POSITIONAL_COPIES:
        return GAUSSIAN_MATRIX
    return apply_rules(hf_name, _BACKWARD)


def meta_to_hf(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rename a Meta SAM 2 state dict (no prefix) to transformers' ``Sam2Model`` names.

    Returns ``(renamed, ignored)``: ``ignored`` holds the video/memory tensors under their Meta names.
    Each tensor is read once, so ``tensors`` may load lazily. Raises :class:`Sam2NameError` naming every
    tensor no rule covers.
    """
    renamed: dict[str, torch.Tensor] = {}
    ignored: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for name in tensors:
        if is_ignored(name):
            ignored[name] = tensors[name]
        elif name == GAUSSIAN_MATRIX:
            matrix = tensors[name]
            renamed[POSITIONAL_COPIES[0]] = matrix
            renamed[POSITIONAL_COPIES[1]] = matrix.clone()  # two buffers in transformers, one tensor in Meta's
        elif (match := _POINT_PATTERN.fullmatch(name)) is not None:
            points[int(match["i"])] = tensors[name]
        elif (target := meta_to_hf_name(name)) is not None:
            renamed[target] = tensors[name]
        else:
            unknown.append(name)
    if unknown:
        raise Sam2NameError(
            f"{len(unknown)} SAM 2 tensor name(s) not covered by the rename rules nor by the ignored video/memory "
            f"modules ({', '.join(IGNORED_MODULES)}): {', '.join(sorted(unknown)[:8])}"
        )
    if points:
        if sorted(points) != list(range(len(points))):
            raise Sam2NameError(f"point embeddings are not numbered 0..{len(points) - 1}: got {sorted(points)}")
        renamed[POINT_EMBED] = torch.cat([points[k] for k in range(len(points))], dim=0)
    return renamed, ignored


def hf_to_meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Sam2Model`` state dict (no prefix) back to Meta's names.

    The point embedding is split into its ``[1, D]`` rows; the two positional matrices must be equal and
    become Meta's one ``positional_encoding_gaussian_matrix``. Raises :class:`Sam2NameError` naming any
    tensor no rule covers, or positional copies that differ.
    """
    meta: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name in tensors:
        if name == POINT_EMBED:
            for k, row in enumerate(tensors[name].split(1, dim=0)):
                meta[POINT_EMBEDDINGS.format(k=k)] = row.clone()  # contiguous, its own storage
        elif name == POSITIONAL_COPIES[0]:
            meta[GAUSSIAN_MATRIX] = tensors[name]
        elif name == POSITIONAL_COPIES[1]:
            continue  # checked below against the prompt encoder's copy
        elif (target := apply_rules(name, _BACKWARD)) is not None:
            meta[target] = tensors[name]
        else:
            unknown.append(name)
    if unknown:
        raise Sam2NameError(
            f"{len(unknown)} transformers SAM 2 tensor name(s) have no original SAM 2 name: "
            f"{', '.join(sorted(unknown)[:8])}"
        )
    if POSITIONAL_COPIES[1] in tensors and POSITIONAL_COPIES[0] in tensors:
        if not torch.equal(tensors[POSITIONAL_COPIES[0]], tensors[POSITIONAL_COPIES[1]]):
            raise Sam2NameError(
                f"{POSITIONAL_COPIES[0]} and {POSITIONAL_COPIES[1]} differ, but the original SAM 2 stores one "
                "matrix (both are fixed random Fourier features; a randomly initialised transformers SAM 2 draws "
                "them apart). Fix: start from released SAM 2 weights, or copy one buffer over the other before "
                "training"
            )
    return meta
