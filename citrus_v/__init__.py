"""Citrus-V: a unified medical vision-language model (text, boxes and ``[SEG]`` masks).

The model and the processor are re-exported here but imported on first use (PEP 562), so that importing a
light part of the package (the command line, the web app, :mod:`citrus_v.media`) does not load torch and
transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .modeling import CitrusV, CitrusVConfig, CitrusVOutput
    from .processing import CitrusVProcessor

__all__ = ["CitrusV", "CitrusVConfig", "CitrusVOutput", "CitrusVProcessor", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("CitrusV", "CitrusVConfig", "CitrusVOutput"):
        from . import modeling as module
    elif name == "CitrusVProcessor":
        from . import processing as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
