"""Checks on a checkpoint folder before transformers loads it.

Weights that do not fit the folder's ``config.json`` get one :class:`~citrus_v.checkpoint_layout.CheckpointError`
naming the file and the fix, not a traceback from inside transformers. The check reads only the safetensors
headers (no weights), against the parameter shapes of a model built on the meta device. Finding and reading the
folder's files (a missing file, a foreign ``model_type``) is :mod:`citrus_v.checkpoint_layout`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint_layout import CONFIG_FILE, REBUILD_HINT, CheckpointError, stored_shapes

# transformers' legacy Qwen2.5-VL names (what `save_original_format=True` writes), mapped to the in-memory
# names; transformers applies the same mapping when it loads them.
_LEGACY_MLLM_NAMES = (
    (re.compile(r"^mllm\.model\.(?!language_model\.|visual\.)"), "mllm.model.language_model."),
    (re.compile(r"^mllm\.visual\."), "mllm.model.visual."),
)


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
