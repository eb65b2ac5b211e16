"""The SAM 2 architectures Meta released (Hiera T, S, B+, L), as transformers ``Sam2Config`` objects.

An original checkpoint does not say which architecture it holds. It is read from a name — upstream's
``grounding_encoder_config.cfg_path`` (``.../sam2_hiera_l.yaml``) or the file name (``sam2.1_hiera_large.pt``)
— or, failing that, from the tensor shapes: the trunk's width and block count tell the four apart. The
window sizes and global-attention blocks cannot be read from shapes, which is why the table is needed.
SAM 2.0 and 2.1 share these architectures (2.1 only adds video-only tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath

from transformers import Sam2Config

TRUNK_PATCH = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK = re.compile(r"image_encoder\.trunk\.blocks\.(\d+)\.")
_ALIAS = re.compile(r"sam2(?:\.1)?_hiera_(tiny|t|small|s|base_plus|b\+|large|l)(?![a-z])")
_SHORT = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


@dataclass(frozen=True)
class Sam2Variant:
    """One SAM 2 architecture: its Meta config name, a factory for its config, and its shape signature."""

    name: str
    make_config: Callable[[], Sam2Config]
    embed_dim: int
    num_blocks: int

    def config(self) -> Sam2Config:
        return self.make_config()


def hiera_config(
    embed_dim: int,
    num_heads: int,
    blocks_per_stage: list[int],
    global_attention_blocks: list[int],
    window_size_per_stage: list[int],
    window_background: list[int],
) -> Sam2Config:
    """A 1024-pixel SAM 2 with a four-stage Hiera trunk (widths and heads double per stage), FPN width 256."""
    dims = [embed_dim * 2**k for k in range(4)]
    return Sam2Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                hidden_size=embed_dim,
                num_attention_heads=num_heads,
                blocks_per_stage=blocks_per_stage,
                embed_dim_per_stage=dims,
                num_attention_heads_per_stage=[num_heads * 2**k for k in range(4)],
                global_attention_blocks=global_attention_blocks,
                window_size_per_stage=window_size_per_stage,
                window_positional_embedding_background_size=window_background,
            ),
            backbone_channel_list=dims[::-1],
        ),
    )


def _variant(name: str, embed_dim: int, heads: int, blocks: list[int], global_blocks: list[int], windows, bkg):
    return Sam2Variant(
        name,
        lambda: hiera_config(embed_dim, heads, blocks, global_blocks, windows, bkg),
        embed_dim,
        sum(blocks),
    )


# Meta's configs sam2_hiera_{t,s,b+,l}.yaml (the same for sam2.1_hiera_*.yaml).
VARIANTS: dict[str, Sam2Variant] = {
    v.name: v
    for v in (
        _variant("sam2_hiera_t", 96, 1, [1, 2, 7, 2], [5, 7, 9], [8, 4, 14, 7], [7, 7]),
        _variant("sam2_hiera_s", 96, 1, [1, 2, 11, 2], [7, 10, 13], [8, 4, 14, 7], [7, 7]),
        _variant("sam2_hiera_b+", 112, 2, [2, 3, 16, 3], [12, 16, 20], [8, 4, 14, 7], [14, 14]),
        _variant("sam2_hiera_l", 144, 2, [2, 6, 36, 4], [23, 33, 43], [8, 4, 16, 8], [7, 7]),
    )
}


class Sam2VariantError(ValueError):
    """The SAM 2 architecture of a checkpoint cannot be determined, or its name and shapes disagree."""


def variant_from_name(name: str | PurePath | None) -> Sam2Variant | None:
    """The variant a config or file name refers to (``sam2_hiera_l.yaml``, ``sam2.1_hiera_large.pt``), if any."""
    if not name:
        return None
    base = PurePath(str(name)).name.lower()
    stem = re.sub(r"\.(yaml|yml|pt|pth|safetensors)$", "", base)
    if stem in VARIANTS:
        return VARIANTS[stem]
    match = _ALIAS.search(base)
    if match is None:
        return None
    return VARIANTS.get("sam2_hiera_" + _SHORT.get(match[1], match[1]))


def shape_signature(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(trunk width, number of trunk blocks) from Meta-named tensor shapes, or ``None`` without a trunk."""
    if TRUNK_PATCH not in shapes:
        return None
    blocks = {int(m[1]) for name in shapes if (m := _BLOCK.match(name))}
    return int(shapes[TRUNK_PATCH][0]), len(blocks)


def variant_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> Sam2Variant | None:
    """The variant whose trunk width and block count match Meta-named tensor shapes, if exactly one does."""
    signature = shape_signature(shapes)
    matches = [v for v in VARIANTS.values() if (v.embed_dim, v.num_blocks) == signature]
    return matches[0] if len(matches) == 1 else None


def resolve_variant(
    names: Iterable[str | PurePath | None], shapes: Mapping[str, tuple[int, ...]], source: str
) -> Sam2Variant:
    """Pick the variant from the first recognised name, checked against the shapes; else from the shapes alone.

    ``source`` names the checkpoint in error messages.
    """
    signature = shape_signature(shapes)
    for name in names:
        variant = variant_from_name(name)
        if variant is None:
            continue
        if signature is not None and signature != (variant.embed_dim, variant.num_blocks):
            raise Sam2VariantError(
                f"{source}: the name {str(name)!r} says {variant.name} (trunk width {variant.embed_dim}, "
                f"{variant.num_blocks} blocks) but the weights have trunk width {signature[0]} and {signature[1]} "
                "blocks. Fix: give the config name that matches the weights"
            )
        return variant
    variant = variant_from_shapes(shapes)
    if variant is None:
        known = ", ".join(f"{v.name} ({v.embed_dim}/{v.num_blocks})" for v in VARIANTS.values())
        raise Sam2VariantError(
            f"{source}: cannot tell which SAM 2 architecture this is (trunk width/blocks {signature}; known: "
            f"{known}). Fix: name the file or cfg_path after Meta's config, e.g. sam2_hiera_l"
        )
    return variant
