"""OpenAI chat messages -> a predictor :class:`~citrus_v.infer.predictor.Request`.

System (and ``developer``) messages come first and become the system prompt; the last message is the user's
question; earlier user/assistant turns become the history. Each image part — OpenAI's ``image_url`` or
ms-swift's ``image`` — becomes an ``<image>`` placeholder at its place in the text, and images are numbered in
order over the whole conversation (masks and boxes refer to image 0).
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..infer.predictor import Request
from ..tokens import IMAGE_PLACEHOLDER, STRUCTURAL_TOKENS
from .media import MediaError
from .protocol import ChatMessage, ImagePart, ImageURL, SwiftImagePart, TextPart

ImageLoader = Callable[[str, str], Image.Image]  # (reference, param name) -> image

# typed into a message these would forge turns or image slots, so they are refused
RESERVED = (IMAGE_PLACEHOLDER, *STRUCTURAL_TOKENS)


def _image(part: ImagePart | SwiftImagePart, param: str, load: ImageLoader, load_value: ImageLoader) -> Image.Image:
    """The image of an ``image_url`` part (a URL) or of an ms-swift ``image`` part (a URL, path or base64)."""
    if isinstance(part, ImagePart):
        value = part.image_url
        inner = f"{param}.image_url" + (".url" if isinstance(value, ImageURL) else "")
        return load(value.url if isinstance(value, ImageURL) else value, inner)
    value = part.image
    inner = f"{param}.image" + (".url" if isinstance(value, ImageURL) else "")
    return load_value(value.url if isinstance(value, ImageURL) else value, inner)


def _content(
    message: ChatMessage, index: int, loaders: tuple[ImageLoader, ImageLoader], images: list, allow_images: bool
) -> str:
    content = message.content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    pieces: list[str] = []
    for k, part in enumerate(parts):
        param = f"messages.{index}.content" + ("" if isinstance(content, str) else f".{k}")
        if isinstance(part, TextPart):
            reserved = next((token for token in RESERVED if token in part.text), None)
            if reserved is not None:
                hint = "; send each image as an image or image_url part" if reserved == IMAGE_PLACEHOLDER else ""
                raise MediaError(
                    f"text must not contain the reserved token {reserved}{hint}", "invalid_message", 400, param
                )
            pieces.append(part.text)
        else:
            if not allow_images:
                raise MediaError(
                    f"{message.role} messages cannot hold images; put images in user messages",
                    "invalid_message",
                    400,
                    param,
                )
            images.append(_image(part, param, *loaders))
            pieces.append(IMAGE_PLACEHOLDER)
    return "".join(pieces)


def to_request(messages: list[ChatMessage], load: ImageLoader, load_value: ImageLoader | None = None) -> Request:
    """Turn OpenAI ``messages`` into a :class:`Request`, loading ``image_url`` URLs through ``load`` and ms-swift
    ``image`` values through ``load_value`` (default: ``load``)."""
    loaders = (load, load_value or load)
    images: list[Image.Image] = []
    systems: list[str] = []
    turns: list[dict] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            if turns:
                raise MediaError(
                    "system messages must come before the conversation", "invalid_message", 400, f"messages.{index}"
                )
            systems.append(_content(message, index, loaders, images, allow_images=False))
            continue
        text = _content(message, index, loaders, images, allow_images=message.role == "user")
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
