"""The released upstream layout (``Citrus-V-8B-v1.0``): recognise it, and read its SAM 2 configuration.

Upstream keeps SAM 2 under ``grounding_encoder.sam2_model.`` in Meta's original names, and its ``config.json``
names the architecture only by ``cfg_path`` (``.../sam2_hiera_l.yaml``) unless it embeds a ``sam2_config``.
Reading the weights in that layout is :mod:`citrus_v.modeling.upstream_checkpoint`; what is here needs only
``config.json`` and the safetensors headers, so that the processor can learn the SAM sizes of a folder without
the model. transformers is imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .files import CheckpointError, read_config_dict, stored_names, stored_shapes, weight_files

if TYPE_CHECKING:
    from transformers import Sam2Config

META_PREFIX = "grounding_encoder.sam2_model."


class TensorShapes(Protocol):
    """Stored tensor names with their shapes (the model loader's ``ShardedTensors`` is one)."""

    def __iter__(self) -> Iterator[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


class HeaderShapes:
    """:class:`TensorShapes` read from the safetensors headers (no tensor is read)."""

    def __init__(self, files: list[Path]) -> None:
        self._shapes = {name: shape for name, (shape, _path) in stored_shapes(files).items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def is_upstream_layout(files: list[Path]) -> bool:
    """Whether the weights hold SAM 2 in Meta's names under ``grounding_encoder.sam2_model.`` (upstream's layout)."""
    return any(name.startswith(META_PREFIX) for name in stored_names(files))


def is_upstream_folder(directory: str | Path) -> bool:
    """Whether ``directory`` is a Citrus-V folder in the upstream layout (config and weights are checked)."""
    directory = Path(directory)
    try:
        read_config_dict(directory)
        return is_upstream_layout(weight_files(directory))
    except (CheckpointError, OSError, json.JSONDecodeError, KeyError):
        return False


def upstream_sam2_config(config_dict: dict, shapes: TensorShapes, source: Path) -> Sam2Config:
    """The SAM 2 configuration of an upstream folder: an embedded ``sam2_config``, else ``cfg_path``, else shapes."""
    from transformers import Sam2Config

    from .sam2_variants import Sam2VariantError, resolve_variant

    grounding = config_dict.get("grounding_encoder_config") or {}
    if isinstance(grounding.get("sam2_config"), dict):
        return Sam2Config(**{k: v for k, v in grounding["sam2_config"].items() if k != "model_type"})
    sam_shapes = {name[len(META_PREFIX) :]: shapes.shape(name) for name in shapes if name.startswith(META_PREFIX)}
    try:
        variant = resolve_variant([grounding.get("cfg_path"), grounding.get("ckpt_path")], sam_shapes, str(source))
    except Sam2VariantError as err:
        raise CheckpointError(str(err)) from err
    return variant.config()


def upstream_sam_sizes(directory: str | Path) -> tuple[int, int] | None:
    """(SAM input side, low-res mask side) of an upstream-layout folder, or ``None`` for other folders."""
    directory = Path(directory)
    if not is_upstream_folder(directory):
        return None
    files = weight_files(directory)
    sam2 = upstream_sam2_config(read_config_dict(directory), HeaderShapes(files), directory)
    prompt = sam2.prompt_encoder_config
    return int(prompt.image_size), int(prompt.image_size // prompt.patch_size * 4)
