"""The OpenAI chat-completions protocol as pydantic models, plus Citrus-V's ``grounding`` object.

Requests follow the OpenAI chat format (``messages`` with ``text`` and ``image_url`` content parts).
Each answer's message carries the usual ``content`` and a ``grounding`` object::

    "grounding": {
      "image_index": 0,                      # which image of the request the pixels refer to
      "image_size": {"width": W, "height": H},  # that image's original size
      "boxes": [{"bbox_2d": [x1, y1, x2, y2], "label": "heart"}],
      "masks": [{"index": 0,                 # which [SEG] of the answer, in order
                 "label": "lesion",          # the phrase before that [SEG], or null
                 "score": 0.91,              # SAM 2's predicted IoU
                 "bbox": [x, y, w, h],       # COCO box of the mask (empty mask: [0, 0, 0, 0])
                 "area": 1234,               # foreground pixels
                 "segmentation": {"size": [H, W], "counts": "..."}}]}  # COCO RLE (pycocotools)

All coordinates are pixels of the original image (not the model's resized image). Boxes come from the
answer text; masks are one per ``[SEG]`` token. ``grounding`` is ``null`` for a request without images.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr


def _whole_number(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer: accept whole floats, still refuse strings and booleans."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _whole(**bounds: int) -> Any:
    """A strict integer within ``bounds`` that also takes whole floats.

    The bounds sit in the same ``Field`` as ``strict`` so that the OpenAPI schema states them as
    ``minimum``/``maximum`` (bounds on a nested ``Annotated`` come out as unknown ``ge``/``le`` keys that
    clients and schema-based tools ignore).
    """
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_whole_number)]


class _Strict(BaseModel):
    """Rejects wrong JSON types instead of coercing them ("1" is not a number)."""

    model_config = ConfigDict(strict=True, extra="ignore")


# --- request -------------------------------------------------------------------------------------------------
class ImageURL(_Strict):
    url: StrictStr = Field(description="a data: URL (base64), or a local path / file:// URL when the server allows")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: _whole(ge=1) | None = None
    max_completion_tokens: _whole(ge=1) | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: _whole() | None = None  # any integer: the server reduces it modulo 2**64 (what torch.manual_seed takes)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: _whole(ge=1, le=1) = 1

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


# --- grounding -----------------------------------------------------------------------------------------------
class ImageSize(BaseModel):
    width: int
    height: int


class GroundingBox(BaseModel):
    bbox_2d: list[float] = Field(description="[x1, y1, x2, y2] in original-image pixels")
    label: str | None = None


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="compressed COCO RLE counts (pycocotools)")


class GroundingMask(BaseModel):
    index: int = Field(description="which [SEG] token of the answer (0-based)")
    label: str | None = Field(default=None, description="the phrase just before that [SEG]")
    score: float = Field(description="predicted IoU of the mask")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the mask")
    area: int
    segmentation: RLE


class Grounding(BaseModel):
    image_index: int = 0
    image_size: ImageSize
    boxes: list[GroundingBox] = Field(default_factory=list)
    masks: list[GroundingMask] = Field(default_factory=list)


# --- response ------------------------------------------------------------------------------------------------
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = Field(default=None, description="the <think> part, when present")
    grounding: Grounding | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    grounding: Grounding | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the last content chunk's delta holds ``grounding``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "citrus-v"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queued: int = 0


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an OpenAI-style error."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()
