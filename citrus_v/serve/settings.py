"""What ``citrus-v deploy`` configures for the server (flag names as upstream's ``swift deploy`` where it has them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..media.errors import DEFAULT_MAX_DECODED_BYTES
from .generation_defaults import GenerationDefaults
from .limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from .media import DEFAULT_MAX_IMAGE_PIXELS
from .request_budget import DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_PIXELS
from .video_sources import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_VOXELS


@dataclass
class ServerSettings:
    """The served name, access, batching, limits (images, and volumes and clips), and the sampling defaults of
    requests that leave fields out.

    ``max_inflight_memory_bytes`` is the memory budget of the requests in flight (``None``: a quarter of the
    memory the server may use, see :func:`~citrus_v.serve.admission.default_inflight_memory_mb`)."""

    served_model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    request_timeout: float = 300.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S  # seconds a client may pause while sending its body
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES  # all videos (volumes, clips) of one request together
    max_video_voxels: int = DEFAULT_MAX_VIDEO_VOXELS  # the same, frames x height x width x samples
    max_inflight_memory_bytes: int | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    max_tokens_limit: int = 8192
