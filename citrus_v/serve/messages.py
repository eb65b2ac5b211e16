"""OpenAI chat messages -> a predictor :class:`~citrus_v.infer.predictor.Request`.

System (and ``developer``) messages come first and become the system prompt; the last message is the user's
question; earlier user/assistant turns become the history. Each ``image_url`` part becomes an ``<image>``
placeholder at its place in the text, and images are numbered in order over the whole conversation
(masks and boxes refer to image 0).
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..infer.predictor import Request
from ..tokens import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from .media import MediaError
from .protocol import ChatMessage, ImagePart, TextPart

ImageLoader = Callable[[str, str], Image.Image]  # (url, param name) -> image

# Tokens that structure the prompt (turns, image slots): typed into a message they would forge turns or
# image slots, so they are refused. ``[SEG]`` and box tokens may appear (earlier answers hold them).
RESERVED = (
    IMAGE_PLACEHOLDER,
    IM_START,
    IM_END,
    ENDOFTEXT,
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)


def _content(message: ChatMessage, index: int, load: ImageLoader, images: list[Image.Image], allow_images: bool) -> str:
    content = message.content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    pieces: list[str] = []
    for k, part in enumerate(parts):
        param = f"messages.{index}.content" + ("" if isinstance(content, str) else f".{k}")
        if isinstance(part, TextPart):
            reserved = next((token for token in RESERVED if token in part.text), None)
            if reserved is not None:
                hint = "; send each image as an image_url content part" if reserved == IMAGE_PLACEHOLDER else ""
                raise MediaError(
                    f"text must not contain the reserved token {reserved}{hint}", "invalid_message", 400, param
                )
            pieces.append(part.text)
        elif isinstance(part, ImagePart):
            if not allow_images:
                raise MediaError(
                    f"{message.role} messages cannot hold images; put images in user messages",
                    "invalid_message",
                    400,
                    param,
                )
            images.append(load(part.image_url.url, f"{param}.image_url.url"))
            pieces.append(IMAGE_PLACEHOLDER)
    return "".join(pieces)


def to_request(messages: list[ChatMessage], load: ImageLoader) -> Request:
    """Turn OpenAI ``messages`` into a :class:`Request`, loading images through ``load``."""
    images: list[Image.Image] = []
    systems: list[str] = []
    turns: list[dict] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            if turns:
                raise MediaError(
                    "system messages must come before the conversation", "invalid_message", 400, f"messages.{index}"
                )
            systems.append(_content(message, index, load, images, allow_images=False))
            continue
        text = _content(message, index, load, images, allow_images=message.role == "user")
        turns.append({"role": message.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise MediaError("the last message must be the user's", "invalid_message", 400, "messages")
    for previous, current in zip(turns, turns[1:], strict=False):
        if previous["role"] == current["role"]:
            raise MediaError("user and assistant messages must alternate", "invalid_message", 400, "messages")
    return Request(
        images=images,
        prompt=turns[-1]["content"],
        system="\n".join(systems) if systems else None,
        history=turns[:-1],
    )
