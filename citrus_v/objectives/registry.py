"""The registry of training-only objectives: every :class:`~.base.Objective` subclass in this folder.

Each module of the folder is imported once, in name order, and its ``Objective`` subclasses are registered:
adding an objective is one new file, deleting its file removes it. Everything else asks here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .base import Objective, blank_targets, collate_image_tokens, collate_positions

_SUPPORT_MODULES = {"annotations", "base", "registry"}


@cache
def registered() -> tuple[Objective, ...]:
    """One instance of every objective found in this folder, in file-name order."""
    found: list[Objective] = []
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if module.name in _SUPPORT_MODULES or module.name.startswith("_"):
            continue
        loaded = importlib.import_module(f"{__package__}.{module.name}")
        for value in vars(loaded).values():
            if isinstance(value, type) and issubclass(value, Objective) and value is not Objective:
                if value.__module__ == loaded.__name__:
                    found.append(value())
    names = [o.name for o in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two objectives share a name: {names}")
    return tuple(found)


def enabled(config: Any) -> tuple[Objective, ...]:
    """The objectives the config turns on."""
    return tuple(o for o in registered() if o.enabled(config))


def with_targets() -> tuple[Objective, ...]:
    """The objectives whose targets travel in batches (``objective_targets``)."""
    return tuple(o for o in registered() if o.layout != "none")


def head_prefixes(component: str | None = None) -> tuple[str, ...]:
    """Tensor-name prefixes of the objectives' heads (of those that train with ``component`` when given)."""
    return tuple(
        f"{o.head_attribute}."
        for o in registered()
        if o.head_attribute and (component is None or o.trains_with == component)
    )


def log_names() -> tuple[str, ...]:
    return tuple(o.log_name for o in registered())


def preset_config() -> dict[str, Any]:
    """The config overrides that switch every objective on, as the tiny preset trains."""
    merged: dict[str, Any] = {}
    for objective in registered():
        merged.update(objective.preset)
    return merged


def collate_targets(
    samples: Sequence[dict[str, Any]], merge: int, rows: Sequence[Sequence[int]], width: int, side: str = "right"
) -> dict[str, Any]:
    """The ``objective_targets`` of a batch: each objective's per-sample targets (``samples[i]
    ["objective_targets"]``) laid out as its ``layout`` says. ``rows`` lists the sample indices of each batch
    row in order (one each when padded, several when packed), ``width`` the row length, ``side`` the padding
    side; image-token targets follow the samples' order, which is the order of their ``pixel_values``."""
    grids = [s.get("image_grid_thw") if s.get("pixel_values") is not None else None for s in samples]
    out: dict[str, Any] = {}
    for objective in with_targets():
        per_sample = [(s.get("objective_targets") or {}).get(objective.name) for s in samples]
        if objective.layout == "image_tokens":
            value = collate_image_tokens(per_sample, grids, merge)
        else:
            layout = [[(per_sample[i], len(samples[i]["input_ids"])) for i in row] for row in rows]
            value = collate_positions(layout, width, side)
        if value is not None:
            out[objective.name] = value
    return out


def blank(targets: dict[str, Any]) -> dict[str, Any]:
    """A batch's ``objective_targets`` with nothing left to learn from (the stand-in batch of skipped rows)."""
    layouts = {o.name: o.layout for o in registered()}
    return {name: blank_targets(layouts.get(name, "none"), value) for name, value in targets.items()}
