"""OpenAI chat messages -> a predictor :class:`~citrus_v.infer.predictor.Request`, in two steps.

:func:`read_messages` walks the messages without decoding anything: system (and ``developer``) messages come
first and become the system prompt; the last message is the user's question; earlier user/assistant turns
become the history. Each image part — OpenAI's ``image_url`` or ms-swift's ``image`` — becomes an ``<image>``
placeholder at its place in the text and an :class:`ImageSource` (the reference as sent, and where it was), and
images are numbered in order over the whole conversation (masks and boxes refer to image 0). Each video part — a
volume or a clip, as ``video_url`` or ms-swift's ``video`` — becomes a ``<video>`` placeholder and a
:class:`VideoSource` the same way (3-D masks refer to video 0). The server reads every image's and video's
header and checks the whole request before :meth:`Conversation.request` decodes any pixel; :func:`to_request`
does both steps at once for images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from ..infer.predictor import Request
from ..media import Volume
from ..tokens import IMAGE_PLACEHOLDER, STRUCTURAL_TOKENS, VIDEO_PLACEHOLDER
from .media import MediaError
from .protocol import ChatMessage, ImagePart, SwiftImagePart, SwiftVideoPart, TextPart, VideoPart, media_reference

ImageLoader = Callable[[str, str], Image.Image]  # (reference, param name) -> image

# typed into a message these would forge turns or image and video slots, so they are refused
RESERVED = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, *STRUCTURAL_TOKENS)


@dataclass(frozen=True)
class ImageSource:
    """One image of a request as sent, not decoded: ``reference`` is a URL (OpenAI ``image_url``) or, with
    ``swift_value``, an ms-swift ``image`` value (a URL, a path or bare base64); ``param`` names its place."""

    reference: str
    param: str
    swift_value: bool = False

    def load(self, load: ImageLoader, load_value: ImageLoader) -> Image.Image:
        """The decoded image, through the loader of its form."""
        return (load_value if self.swift_value else load)(self.reference, self.param)


@dataclass(frozen=True)
class VideoSource:
    """One video (a volume or a clip) of a request as sent, not decoded: ``reference`` is a URL (``video_url``)
    or, with ``swift_value``, an ms-swift ``video`` value (a URL, a path or bare base64); ``param`` names its
    place."""

    reference: str
    param: str
    swift_value: bool = False


@dataclass
class Conversation:
    """The messages of a request with every image and video still a reference: what the checks before decoding
    read."""

    sources: list[ImageSource] = field(default_factory=list)
    prompt: str = ""
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    videos: list[VideoSource] = field(default_factory=list)

    def messages(self) -> list[dict]:
        """The turns as the chat template takes them (``<image>`` and ``<video>`` placeholders in place), the
        question last."""
        return [*self.history, {"role": "user", "content": self.prompt}]

    def request(self, images: list[Image.Image], videos: list[Volume] | None = None) -> Request:
        """The predictor's request, with ``images`` decoded from :attr:`sources` and ``videos`` from
        :attr:`videos`, in order."""
        return Request(
            images=images, prompt=self.prompt, system=self.system, history=list(self.history), videos=videos or []
        )


def _source(part: ImagePart | SwiftImagePart | VideoPart | SwiftVideoPart, param: str) -> ImageSource | VideoSource:
    """The reference of an image or video part: OpenAI's ``image_url`` / ``video_url`` (a URL) or ms-swift's
    ``image`` / ``video`` (a URL, path or base64)."""
    reference, inner = media_reference(part)
    swift = isinstance(part, (SwiftImagePart, SwiftVideoPart))
    kind = VideoSource if isinstance(part, (VideoPart, SwiftVideoPart)) else ImageSource
    return kind(reference, f"{param}.{inner}", swift_value=swift)


def _content(message: ChatMessage, index: int, conversation: Conversation, allow_images: bool) -> str:
    content = message.content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    pieces: list[str] = []
    for k, part in enumerate(parts):
        param = f"messages.{index}.content" + ("" if isinstance(content, str) else f".{k}")
        if isinstance(part, TextPart):
            reserved = next((token for token in RESERVED if token in part.text), None)
            if reserved is not None:
                hint = {
                    IMAGE_PLACEHOLDER: "; send each image as an image or image_url part",
                    VIDEO_PLACEHOLDER: "; send each volume or clip as a video or video_url part",
                }.get(reserved, "")
                raise MediaError(
                    f"text must not contain the reserved token {reserved}{hint}", "invalid_message", 400, param
                )
            pieces.append(part.text)
        else:
            if not allow_images:
                raise MediaError(
                    f"{message.role} messages cannot hold images or videos; put them in user messages",
                    "invalid_message",
                    400,
                    param,
                )
            source = _source(part, param)
            if isinstance(source, VideoSource):
                conversation.videos.append(source)
                pieces.append(VIDEO_PLACEHOLDER)
            else:
                conversation.sources.append(source)
                pieces.append(IMAGE_PLACEHOLDER)
    return "".join(pieces)


def read_messages(messages: list[ChatMessage]) -> Conversation:
    """Check the order and text of OpenAI ``messages`` and collect their image and video references, decoding nothing;
    raises :class:`MediaError` (``invalid_message``) saying what is wrong."""
    conversation = Conversation()
    systems: list[str] = []
    turns: list[dict] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            if turns:
                raise MediaError(
                    "system messages must come before the conversation", "invalid_message", 400, f"messages.{index}"
                )
            systems.append(_content(message, index, conversation, allow_images=False))
            continue
        text = _content(message, index, conversation, allow_images=message.role == "user")
        turns.append({"role": message.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise MediaError("the last message must be the user's", "invalid_message", 400, "messages")
    for previous, current in zip(turns, turns[1:], strict=False):
        if previous["role"] == current["role"]:
            raise MediaError("user and assistant messages must alternate", "invalid_message", 400, "messages")
    conversation.prompt = turns[-1]["content"]
    conversation.system = "\n".join(systems) if systems else None
    conversation.history = turns[:-1]
    return conversation


def to_request(messages: list[ChatMessage], load: ImageLoader, load_value: ImageLoader | None = None) -> Request:
    """Turn OpenAI ``messages`` into a :class:`Request`, loading ``image_url`` URLs through ``load`` and ms-swift
    ``image`` values through ``load_value`` (default: ``load``)."""
    conversation = read_messages(messages)
    value_loader = load_value or load
    return conversation.request([source.load(load, value_loader) for source in conversation.sources])
