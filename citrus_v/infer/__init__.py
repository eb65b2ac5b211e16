"""Inference: the predictor (one generation pass with [SEG] capture; a 3-D mask per [SEG] for a volume or clip)
and its result types.

The result types are light (numpy) and imported at once; the predictor, which needs torch and transformers,
is imported on first use (PEP 562), so that the web app can use the result types without the model's stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .results import Box, MaskResult, Prediction, VolumeMask

if TYPE_CHECKING:
    from .predictor import CitrusVPredictor, GenerationSettings, Request, VideoPrediction

__all__ = [
    "Box",
    "CitrusVPredictor",
    "GenerationSettings",
    "MaskResult",
    "Prediction",
    "Request",
    "VideoPrediction",
    "VolumeMask",
]
_LAZY = ("CitrusVPredictor", "GenerationSettings", "Request", "VideoPrediction")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import predictor

    value = getattr(predictor, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
