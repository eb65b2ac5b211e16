"""Training-only auxiliary objectives, one file each, behind one interface (:mod:`.base`, :mod:`.registry`)."""

from .annotations import AnnotationError
from .base import EncodeContext, Objective, ObjectiveInputs
from .registry import (
    blank,
    collate_targets,
    enabled,
    head_prefixes,
    log_names,
    preset_config,
    registered,
    with_targets,
)

__all__ = [
    "AnnotationError",
    "EncodeContext",
    "Objective",
    "ObjectiveInputs",
    "blank",
    "collate_targets",
    "enabled",
    "head_prefixes",
    "log_names",
    "preset_config",
    "registered",
    "with_targets",
]
