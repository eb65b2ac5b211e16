"""Citrus-V: a unified medical vision-language model (text, boxes and ``[SEG]`` masks)."""

__version__ = "0.1.0"

from .modeling import CitrusV, CitrusVConfig, CitrusVOutput  # noqa: E402
from .processing import CitrusVProcessor  # noqa: E402

__all__ = ["CitrusV", "CitrusVConfig", "CitrusVOutput", "CitrusVProcessor", "__version__"]
