"""Inference: the predictor (one generation pass with [SEG] capture) and its result types.

The result types are light (numpy) and imported at once; the predictor, which needs torch and transformers,
is imported on first use (PEP 562), so that the web app can use the result types without the model's stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .results import Box, MaskResult, Prediction

if TYPE_CHECKING:
    from .predictor import CitrusVPredictor, GenerationSettings, Request

__all__ = ["Box", "CitrusVPredictor", "GenerationSettings", "MaskResult", "Prediction", "Request"]


def __getattr__(name: str) -> Any:
    if name not in ("CitrusVPredictor", "GenerationSettings", "Request"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import predictor

    value = getattr(predictor, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
