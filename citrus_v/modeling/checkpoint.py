"""Checks on a checkpoint folder before transformers loads it.

A folder with a missing file, a foreign ``model_type``, or weights that do not fit its ``config.json``
gets one :class:`CheckpointError` naming the file and the fix, not a traceback from inside transformers.
The check reads only ``config.json`` and the safetensors headers (no weights), against the parameter
shapes of a model built on the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
REBUILD_HINT = "rebuild the folder with `citrus-v build`"

# transformers' legacy Qwen2.5-VL names (what `save_original_format=True` writes), mapped to the in-memory
# names; transformers applies the same mapping when it loads them.
_LEGACY_MLLM_NAMES = (
    (re.compile(r"^mllm\.model\.(?!language_model\.|visual\.)"), "mllm.model.language_model."),
    (re.compile(r"^mllm\.visual\."), "mllm.model.visual."),
)


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
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = (tuple(handle.get_slice(name).get_shape()), path)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}). Fix: {REBUILD_HINT}") from err
    return shapes


def canonical_name(name: str) -> str:
    """The in-memory name of a stored tensor name (legacy ``mllm.model.layers``/``mllm.visual`` names mapped)."""
    for pattern, replacement in _LEGACY_MLLM_NAMES:
        name = pattern.sub(replacement, name)
    return name


def check_weights(
    model: torch.nn.Module, files: list[Path], ignore: tuple[str, ...] = (), may_be_missing: tuple[str, ...] = ()
) -> None:
    """Compare the stored tensors with the parameters of ``model`` (which may live on the meta device).

    Names starting with ``may_be_missing`` may be absent from the files (they start from their initialisation).
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {canonical_name(name): value for name, value in stored_shapes(files).items()}
    config_path = files[0].parent / CONFIG_FILE
    problems = []
    for name, (shape, path) in stored.items():
        if name in expected and expected[name] != shape:
            problems.append(
                f"{path.name}: {name} has shape {list(shape)} but {config_path.name} implies {list(expected[name])}"
            )
    missing = [n for n in expected if n not in stored and not n.startswith(ignore + may_be_missing)]
    unexpected = [n for n in stored if n not in expected and not n.startswith(ignore)]
    raise_weight_problems(
        problems,
        missing,
        unexpected,
        header=f"the weights in {files[0].parent} do not fit {config_path}",
        fix=f"config.json and the weights come from different models; {REBUILD_HINT}, "
        "or restore the config.json saved with these weights",
        shown=5,
    )


def raise_weight_problems(
    problems: list[str], missing: list[str], unexpected: list[str], header: str, fix: str, shown: int = 5
) -> None:
    """One :class:`CheckpointError` listing shape problems, missing and unexpected tensors (if any)."""
    problems = list(problems)
    if missing:
        problems.append(f"missing from the weights ({len(missing)}): {', '.join(missing[:shown])}")
    if unexpected:
        problems.append(f"not part of the model ({len(unexpected)}): {', '.join(unexpected[:shown])}")
    if problems:
        raise CheckpointError(f"{header}:\n  - " + "\n  - ".join(problems[:12]) + f"\nFix: {fix}")
