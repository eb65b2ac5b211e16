"""The CitrusV model and its parts."""

from .configuration_citrus_v import CitrusVConfig
from .grounding import GroundingEncoder, reinit_fan_in
from .hook_grad import hook_grad
from .modeling_citrus_v import CitrusV, CitrusVOutput, SegTargetError
from .seg_projector import SegProjector

__all__ = [
    "CitrusV",
    "CitrusVConfig",
    "CitrusVOutput",
    "GroundingEncoder",
    "SegProjector",
    "SegTargetError",
    "hook_grad",
    "reinit_fan_in",
]
