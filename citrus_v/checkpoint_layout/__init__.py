"""What a checkpoint folder holds, read without building the model: ``config.json``, the safetensors headers,
the released upstream layout and the SAM 2 architecture it names.

Below both the processor and the model: the processor reads the SAM sizes of an upstream folder here, and the
model's loader (:mod:`citrus_v.modeling`) builds on the same functions. Importing this package pulls neither
torch nor transformers; its table of SAM 2 architectures (:mod:`~citrus_v.checkpoint_layout.sam2_variants`,
transformers ``Sam2Config`` objects) is imported on first use.
"""

from .files import (
    CONFIG_FILE,
    REBUILD_HINT,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    read_config_dict,
    stored_names,
    stored_shapes,
    weight_files,
)
from .names import SHIPPED_MODELS, resolve_model
from .upstream import (
    META_PREFIX,
    HeaderShapes,
    TensorShapes,
    is_upstream_folder,
    is_upstream_layout,
    upstream_sam2_config,
    upstream_sam_sizes,
)

__all__ = [
    "CONFIG_FILE",
    "META_PREFIX",
    "REBUILD_HINT",
    "SHIPPED_MODELS",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "CheckpointError",
    "HeaderShapes",
    "TensorShapes",
    "is_upstream_folder",
    "is_upstream_layout",
    "read_config_dict",
    "resolve_model",
    "stored_names",
    "stored_shapes",
    "upstream_sam2_config",
    "upstream_sam_sizes",
    "weight_files",
]
