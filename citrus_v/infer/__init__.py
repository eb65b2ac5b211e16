"""Inference: the predictor (one generation pass with [SEG] capture) and its result types."""

from .predictor import CitrusVPredictor, GenerationSettings, Request
from .results import Box, MaskResult, Prediction

__all__ = ["Box", "CitrusVPredictor", "GenerationSettings", "MaskResult", "Prediction", "Request"]
