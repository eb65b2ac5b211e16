"""What ``citrus-v deploy`` configures for the server (flag names as upstream's ``swift deploy`` where it has them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .generation_defaults import GenerationDefaults
from .limits import DEFAULT_MAX_BODY_BYTES
from .media import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class ServerSettings:
    """The served name, access, batching, limits, and the sampling defaults of requests that leave fields out."""

    served_model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    request_timeout: float = 300.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    max_tokens_limit: int = 8192
