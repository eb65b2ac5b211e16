"""The files of a Citrus-V checkpoint folder: ``config.json`` and the safetensors weights (one file or shards).

Reading here touches ``config.json`` and the safetensors headers only, never a tensor, so neither torch nor
transformers is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
REBUILD_HINT = "rebuild the folder with `citrus-v build`"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


def read_config_dict(directory: Path) -> dict:
    """``config.json`` of ``directory`` as a dict, with a clear error when missing or invalid."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a model folder. Fix: {REBUILD_HINT}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} line {err.lineno}: invalid JSON ({err.msg}). Fix: {REBUILD_HINT}") from err
    if config.get("model_type") != "citrus_v":
        raise CheckpointError(
            f"{path}: model_type is {config.get('model_type')!r}, expected 'citrus_v'. Fix: to assemble a "
            "Citrus-V model from Qwen2.5-VL and SAM 2 folders run `citrus-v build --mllm DIR --sam2 DIR`"
        )
    return config


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of ``directory`` (one file, or the shards its index lists)."""
    single = directory / WEIGHTS_FILE
    index = directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'). Fix: {REBUILD_HINT}") from err
        shards = sorted({directory / name for name in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shard(s) that are missing: {', '.join(missing)}. Fix: copy the missing "
                "shard files into the folder (a download may have been interrupted)"
            )
        return shards
    raise CheckpointError(
        f"no weights in {directory}: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}. Fix: {REBUILD_HINT}, "
        "or copy the weight files next to config.json"
    )


def stored_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file), read from the safetensors headers only."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as handle:
                for name in handle.keys():
                    shapes[name] = (tuple(handle.get_slice(name).get_shape()), path)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}). Fix: {REBUILD_HINT}") from err
    return shapes


def stored_names(files: list[Path]) -> list[str]:
    """Tensor names of a checkpoint, from the index when there is one, else from the safetensors header."""
    if files[0].name != WEIGHTS_FILE:  # shards listed by the index (see ``weight_files``)
        return list(json.loads((files[0].parent / WEIGHTS_INDEX_FILE).read_text())["weight_map"])
    with safe_open(files[0], framework="numpy") as handle:
        return list(handle.keys())
