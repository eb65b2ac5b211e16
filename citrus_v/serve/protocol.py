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
answer text; masks are one per ``[SEG]`` token. ``grounding`` is ``null`` for a request without images or videos.

A volume (CT, MR: a NIfTI file, a zip or folder of DICOM slices, a multi-frame DICOM) or a clip (an mp4, a cine
loop) comes as a ``{"type": "video_url", "video_url": {"url": ...}}`` part or ms-swift's ``{"type": "video",
"video": ...}``; the answer's ``grounding`` then also holds, for the first video::

      "video_index": 0,
      "video_size": {"frames": N, "height": H, "width": W},   # the source's frames, in display orientation
      "volume_masks": [{"index": 0, "label": "liver",
                        "present": true,          # SAM 2's object score finds the target on some frame
                        "score": 2.3,             # the highest object-score logit over the frames
                        "mode": "per_frame",      # or "memory" (SAM 2 memory propagation)
                        "key_frame": 12,          # the source frame where SAM 2 is most certain
                        "frames": [{"frame": 12, "area": 340, "rle": {"size": [H, W], "counts": "..."}}],
                        "voxels": 5210, "volume_ml": 41.7, "spacing": [2.5, 0.8, 0.8],
                        "bbox3d": {"frames": [9, 17], "rows": [..], "columns": [..], "size_mm": [..]}}],
      "notes": []                                 # e.g. SAM 2 segmented a sample of the frames, and why

Only frames with mask are listed, by their index in the source's stack; an absent target (``present: false``)
lists none; ``image_index`` and ``image_size`` are ``null`` when the request holds no image.

Compatibility with upstream Citrus-V's clients (ms-swift's ``swift deploy``): requests may send images as
ms-swift content parts ``{"type": "image", "image": "data:image/png;base64,..." | "<base64>" | "path"}``, and
every answer also carries upstream's top-level ``raw_response`` object::

    "raw_response": {
      "seg_masks_rle": [{"size": [H, W], "counts": "..."}],  # the first choice's masks, one per [SEG], in order
      "image_grid_thw": [[1, h, w]]}                        # per image: merged-token grid, h·28 × w·28 pixels

``seg_masks_rle`` holds the same masks as ``grounding.masks`` (COCO RLE, pycocotools), at the original image's
size: upstream's clients resize each mask to the original size with nearest neighbour, which leaves these as
they are. ``image_grid_thw`` counts the image's merged tokens (patch × merge = 28 pixels each), so that
``h * 28`` × ``w * 28`` is the smart-resized size the model's box coordinates refer to, as upstream's clients
compute it. (The Qwen2-VL processor's own ``image_grid_thw`` counts 14-pixel patches: twice these values.)
``grounding`` is the documented object; ``raw_response`` is for upstream's clients and holds nothing more.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, model_validator
from pydantic_core import PydanticCustomError

# Validation errors of these types are the client's request being unusable rather than mistyped: answered 400
# with the type as the error code (the others are 422); their ``ctx["field"]`` names the field below ``loc``,
# which the answer puts in ``param`` and before the message.
BAD_REQUEST_ERRORS = ("invalid_text", "invalid_image_url")


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


def _lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (which JSON's ``\\ud800`` escapes can make, but which is no
    Unicode character and cannot be encoded), or ``None``."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _first_bad_text(data: Any) -> tuple[str, int] | None:
    """The dotted path of the first string of ``data`` (decoded JSON) holding a lone surrogate, and where in it;
    a dict key is named by its object's path."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            at = _lone_surrogate(item)
            if at is not None:
                return path, at
        elif isinstance(item, dict):
            inner = []
            for key, value in item.items():
                at = _lone_surrogate(key) if isinstance(key, str) else None
                if at is not None:
                    return (f"{path} (a key)" if path else "a key"), at
                inner.append((f"{path}.{key}" if path else str(key), value))
            pending.extend(reversed(inner))
        elif isinstance(item, list):
            pending.extend(reversed([(f"{path}.{i}" if path else str(i), value) for i, value in enumerate(item)]))
    return None


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be taken apart as a URL (an unclosed ``[`` in its host...), or ``None``."""
    if url.startswith("data:"):  # no host to take apart
        return None
    try:
        urlparse(url)
    except ValueError as err:
        return str(err)
    return None


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
    image_url: ImageURL | StrictStr = Field(description="OpenAI's {url: ...}, or the URL alone as ms-swift sends it")


class SwiftImagePart(_Strict):
    """ms-swift's image part, as upstream Citrus-V's clients send it."""

    type: Literal["image"]
    image: StrictStr | ImageURL = Field(
        description="a data: URL, bare base64 image bytes, or a local path / file:// URL when the server allows"
    )


class VideoURL(_Strict):
    url: StrictStr = Field(
        description="a data: URL (base64) of a NIfTI file, a zip of DICOM slices, a DICOM file or a video (mp4, "
        "webm...), or a local path / file:// URL (a folder: a DICOM series) when the server allows"
    )


class VideoPart(_Strict):
    """OpenAI-style video part: a volume (CT, MR) or a clip (ultrasound, endoscopy), one ``<video>`` of the prompt."""

    type: Literal["video_url"]
    video_url: VideoURL | StrictStr = Field(description="{url: ...}, or the URL alone")


class SwiftVideoPart(_Strict):
    """ms-swift's video part: a volume or a clip, one ``<video>`` of the prompt."""

    type: Literal["video"]
    video: StrictStr | VideoURL = Field(
        description="a data: URL, the file's bytes as bare base64, or a local path / file:// URL (a folder: a DICOM "
        "series) when the server allows"
    )


ContentPart = Annotated[
    TextPart | ImagePart | SwiftImagePart | VideoPart | SwiftVideoPart, Field(discriminator="type")
]

_MEDIA_FIELDS = {ImagePart: "image_url", SwiftImagePart: "image", VideoPart: "video_url", SwiftVideoPart: "video"}


def media_reference(part: Any) -> tuple[str, str]:
    """The URL, path or base64 value of an image or video part, and its field below the part
    (``image_url.url``, ``video``...)."""
    field = _MEDIA_FIELDS[type(part)]
    value = getattr(part, field)
    if isinstance(value, (ImageURL, VideoURL)):
        return value.url, f"{field}.url"
    return value, field


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _urls_parse(self) -> ChatMessage:
        """Every image or video URL or path can at least be taken apart (the media loaders parse it first)."""
        for k, part in enumerate(self.content if isinstance(self.content, list) else []):
            if isinstance(part, TextPart):
                continue
            url, field = media_reference(part)
            problem = _url_problem(url)
            if problem is not None:
                raise PydanticCustomError(
                    "invalid_image_url",
                    "not a usable URL or path ({problem}); send a data: URL, or a path without '[' or ']'",
                    {"field": f"content.{k}.{field}", "problem": problem},
                )
        return self


class StreamOptions(_Strict):
    include_usage: StrictBool = False


N_MAX = 8  # most choices one request may ask for
TOP_LOGPROBS_MAX = 20  # OpenAI's bound
LOGIT_BIAS_MAX = 100.0  # OpenAI's bound, either sign


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``: OpenAI's fields, plus ms-swift's ``top_k`` and ``repetition_penalty``.

    Every field either takes effect, or is accepted as metadata (``user``, ``metadata``...), or is refused with
    a 400 naming it; a field this server does not know is refused the same way (see ``request_fields``).
    """

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        """Refuse a lone UTF-16 surrogate anywhere in the request, before any field is read: it is no character,
        and the tokenizer, the logs and the JSON answer could not encode it."""
        bad = _first_bad_text(data)
        if bad is not None:
            raise PydanticCustomError(
                "invalid_text",
                "the text holds a lone UTF-16 surrogate at character {at}: a JSON escape from \\ud800 to "
                "\\udfff must be one of a pair that makes one character; send valid Unicode text",
                {"field": bad[0], "at": bad[1]},
            )
        return data

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: _whole(ge=-1) | None = Field(
        default=None, description="ms-swift: keep the k most likely tokens; 0 or -1: all"
    )
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="ms-swift / transformers: >1 discourages every token already in the conversation"
    )
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-LOGIT_BIAS_MAX, le=LOGIT_BIAS_MAX)]] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit"
    )
    max_tokens: _whole(ge=1) | None = None
    max_completion_tokens: _whole(ge=1) | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: _whole() | None = None  # any integer: the server reduces it modulo 2**64 (what torch.manual_seed takes)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: _whole(ge=1, le=N_MAX) = 1
    logprobs: StrictBool | None = None
    top_logprobs: _whole(ge=0, le=TOP_LOGPROBS_MAX) | None = None
    # accepted as metadata: they change nothing in the answer
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: dict[StrictStr, Any] | None = None
    service_tier: StrictStr | None = None
    prediction: dict[StrictStr, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # taken only at their neutral values (see request_fields); anything else is refused with a 400
    store: StrictBool | None = None
    tools: list[Any] | None = None
    tool_choice: StrictStr | dict[StrictStr, Any] | None = None
    functions: list[Any] | None = None
    function_call: StrictStr | dict[StrictStr, Any] | None = None
    response_format: dict[StrictStr, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: dict[StrictStr, Any] | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    web_search_options: dict[StrictStr, Any] | None = None
    moderation: Any = None
    # ms-swift's RequestConfig and multimodal fields, as its own client sends them
    num_beams: _whole(ge=1) | None = None
    best_of: _whole(ge=1) | None = None
    length_penalty: float | None = None
    images: list[Any] | None = None
    audios: list[Any] | None = None
    videos: list[Any] | None = None
    objects: dict[StrictStr, Any] | None = None

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


class VideoSize(BaseModel):
    frames: int = Field(description="the source's frames (slices of a volume, frames of a clip)")
    height: int = Field(description="one frame's height in display orientation")
    width: int = Field(description="one frame's width in display orientation")


class FrameMask(BaseModel):
    frame: int = Field(description="the source frame (0-based, in the source's stack order)")
    area: int = Field(description="foreground pixels on that frame")
    rle: RLE = Field(description="the frame's mask, COCO RLE of [height, width]")


class BoundingBox3D(BaseModel):
    frames: list[int] = Field(description="[first, last + 1] source frame with mask")
    rows: list[int] = Field(description="[first, last + 1] row with mask")
    columns: list[int] = Field(description="[first, last + 1] column with mask")
    size_mm: list[float | None] | None = Field(
        default=None, description="(along frames: null for a clip, rows, columns) in mm; null without spacing"
    )


class GroundingVolumeMask(BaseModel):
    """One ``[SEG]``'s mask through a volume or clip: only the frames that hold mask are listed."""

    index: int = Field(description="which [SEG] token of the answer (0-based)")
    label: str | None = Field(default=None, description="the phrase just before that [SEG]")
    present: bool = Field(description="SAM 2's object score finds the target on at least one frame")
    score: float = Field(description="the highest object-score logit over the frames (> 0: present)")
    mode: Literal["per_frame", "memory"] = Field(description="per-frame prompting or SAM 2 memory propagation")
    key_frame: int = Field(description="the source frame where SAM 2 is most certain (memory: where it prompted)")
    frames: list[FrameMask] = Field(default_factory=list, description="the frames with mask, in order")
    voxels: int = Field(description="foreground voxels over all frames")
    volume_ml: float | None = Field(
        default=None, description="mL from the voxel spacing; null for a clip, without spacing, or on a frame sample"
    )
    spacing: list[float] | None = Field(
        default=None, description="(between frames, row, column) in mm, when the source states it"
    )
    bbox3d: BoundingBox3D | None = Field(default=None, description="null for an empty mask")


class Grounding(BaseModel):
    image_index: int | None = Field(default=0, description="the image the 2-D masks refer to; null without one")
    image_size: ImageSize | None = None
    boxes: list[GroundingBox] = Field(default_factory=list)
    masks: list[GroundingMask] = Field(default_factory=list)
    video_index: int | None = Field(
        default=None, description="the video (volume or clip) volume_masks refer to; null without one"
    )
    video_size: VideoSize | None = None
    volume_masks: list[GroundingVolumeMask] = Field(
        default_factory=list, description="one per [SEG], through every frame of the video (requests with a video)"
    )
    notes: list[str] = Field(default_factory=list, description="what a reader of the masks should know")


# --- response ------------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float = Field(description="natural log of the token's probability under the model (-9999.0: ~0)")
    bytes: list[int] | None = Field(default=None, description="the token's own bytes (UTF-8 pieces included)")
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class RawResponse(BaseModel):
    """Upstream Citrus-V's top-level compatibility object (see the module docstring); ``grounding`` is ours."""

    seg_masks_rle: list[RLE] = Field(
        default_factory=list, description="the first choice's masks, one per [SEG], COCO RLE at the original size"
    )
    image_grid_thw: list[list[int]] = Field(
        default_factory=list, description="per image [t, h, w] in merged tokens: h*28 x w*28 is the model's image"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = Field(default=None, description="the <think> part, when present")
    grounding: Grounding | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


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
    raw_response: RawResponse | None = Field(default=None, description="upstream Citrus-V's compatibility field")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    grounding: Grounding | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; each choice's last content chunk holds its ``grounding`` (and
    its ``logprobs`` when asked), and choice 0's also the top-level ``raw_response``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    raw_response: RawResponse | None = None


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
