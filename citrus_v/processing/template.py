"""The ``citrus_v`` chat template: ChatML with ``<image>`` and ``<video>`` placeholders, encoded to ids and labels.

Each message is tokenised on its own, so label boundaries are exact: the loss covers each assistant
reply and its ``<|im_end|>``; system, user and the role headers are masked with ``-100``. Each ``<image>``
becomes ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``, each ``<video>``
the same with ``<|video_pad|>`` (one per merged patch of each pair of frames), as ms-swift's ``qwen2_5_vl``
template writes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..tokens import (
    DEFAULT_SYSTEM,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    VIDEO_PAD,
    VIDEO_PLACEHOLDER,
    VISION_END,
    VISION_START,
)

ROLES = ("system", "user", "assistant")
_MEDIA_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def _place(messages: Sequence[dict], count: int, placeholder: str) -> list[dict]:
    messages = [dict(m) for m in messages]
    placeholders = sum(str(m.get("content", "")).count(placeholder) for m in messages)
    if count and placeholders == 0:
        for message in messages:
            if message.get("role") == "user":
                message["content"] = placeholder * count + str(message.get("content", ""))
                break
    return messages


def place_images(messages: Sequence[dict], num_images: int) -> list[dict]:
    """Copies of ``messages``; with images but no placeholder at all, the placeholders go before the first user
    message's text (the ms-swift convention). Otherwise unchanged (the template checks the count)."""
    return _place(messages, num_images, IMAGE_PLACEHOLDER)


def place_videos(messages: Sequence[dict], num_videos: int) -> list[dict]:
    """:func:`place_images` for ``<video>``: with videos but no ``<video>`` at all, the placeholders go before the
    first user message's text (after :func:`place_images`, so before its ``<image>`` tags, as ms-swift puts them)."""
    return _place(messages, num_videos, VIDEO_PLACEHOLDER)


class TemplateError(ValueError):
    """A conversation that does not fit the template (role, order, image or video count)."""


class SampleTooLongError(TemplateError):
    """A conversation longer than ``max_length`` tokens.

    Samples are never truncated: a cut could fall inside an image's tokens or drop a ``[SEG]`` and leave its
    mask without a token. The sample is dropped instead (``reason = "too_long"``), and the caller counts it.
    """

    reason = "too_long"

    def __init__(self, length: int, max_length: int, image_tokens: int) -> None:
        super().__init__(
            f"{length} tokens (of which {image_tokens} image tokens) exceed max_length {max_length}; the sample is "
            "dropped, not cut (a cut could split an image or lose a [SEG]). Fix: raise max_length, lower "
            "MAX_PIXELS, or shorten the conversation"
        )
        self.length, self.max_length = length, max_length


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]


@dataclass
class _MediaCursor:
    """The pad counts of the conversation's images and videos, in placeholder order, and how many are used."""

    image_tokens: list[int]
    video_tokens: list[int]
    images: int = 0
    videos: int = 0


class ChatTemplate:
    """Encode ms-swift style ``messages`` (``[{"role": ..., "content": "...<image>..."}]``) to token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, default_system: str | None = DEFAULT_SYSTEM) -> None:
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.image_pad_id = self._token_id(IMAGE_PAD)
        # looked up when a video is encoded: a tokenizer without it still encodes images
        self.video_pad_id: int | None = self._known_token_id(VIDEO_PAD)
        self.vision_start_id = self._token_id(VISION_START)
        self.vision_end_id = self._token_id(VISION_END)
        self.im_start_id = self._token_id(IM_START)
        self.im_end_id = self._token_id(IM_END)

    def _token_id(self, token: str) -> int:
        token_id = self._known_token_id(token)
        if token_id is None:
            raise TemplateError(f"the tokenizer has no {token!r} token: it is not a Qwen2.5 ChatML tokenizer")
        return token_id

    def _known_token_id(self, token: str) -> int | None:
        if token not in self.tokenizer.get_vocab():
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else int(token_id)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _content(self, content: str, cursor: _MediaCursor) -> list[int]:
        """Tokenise ``content``, expanding each ``<image>`` and ``<video>`` into its vision tokens."""
        ids: list[int] = []
        parts = _MEDIA_PLACEHOLDER.split(content)  # text, placeholder, text, ...
        for k, part in enumerate(parts):
            if k % 2 == 0:
                ids += self._text(part)
            elif part == IMAGE_PLACEHOLDER:
                ids += self._vision_block(self.image_pad_id, cursor.image_tokens, cursor.images, part, "images")
                cursor.images += 1
            else:
                ids += self._vision_block(self._video_pad_id(), cursor.video_tokens, cursor.videos, part, "videos")
                cursor.videos += 1
        return ids

    def _vision_block(self, pad_id: int, counts: list[int], index: int, placeholder: str, what: str) -> list[int]:
        if index >= len(counts):
            raise TemplateError(
                f"the conversation has more {placeholder} placeholders than {what} ({len(counts)} given): give one "
                f"entry of \"{what}\" per {placeholder}, in order"
            )
        return [self.vision_start_id] + [pad_id] * counts[index] + [self.vision_end_id]

    def _video_pad_id(self) -> int:
        if self.video_pad_id is None:
            raise TemplateError(
                f"the tokenizer has no {VIDEO_PAD!r} token, so it cannot hold a video. Fix: use a Qwen2.5-VL "
                "tokenizer (it has the token), or rebuild the folder with `citrus-v build`"
            )
        return self.video_pad_id

    def encode(
        self,
        messages: Sequence[dict],
        image_tokens: Sequence[int] = (),
        system: str | None = None,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        video_tokens: Sequence[int] = (),
    ) -> EncodedConversation:
        """Encode a conversation.

        Args:
            messages: ``{"role": "system"|"user"|"assistant", "content": str}`` in order.
            image_tokens: number of ``<|image_pad|>`` tokens for each image, in placeholder order.
            video_tokens: number of ``<|video_pad|>`` tokens for each video, in ``<video>`` order.
            system: system prompt; overrides a leading system message and the default one.
            add_generation_prompt: end with an open ``<|im_start|>assistant\\n`` header (inference).
            max_length: raise :class:`SampleTooLongError` when the result is longer (never truncated).
        """
        messages = list(messages)
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TemplateError(f"message {index} must be a dict with 'role' and 'content'; got {message!r}")
            if message["role"] not in ROLES:
                raise TemplateError(f"message {index} has role {message['role']!r}; expected one of {ROLES}")
            if not isinstance(message["content"], str):
                raise TemplateError(f"message {index} content must be a string")
        if messages and messages[0]["role"] == "system":
            system = system if system is not None else messages[0]["content"]
            messages = messages[1:]
        if system is None:
            system = self.default_system
        if any(m["role"] == "system" for m in messages):
            raise TemplateError("a system message may only come first")

        input_ids: list[int] = []
        labels: list[int] = []
        cursor = _MediaCursor(list(image_tokens), list(video_tokens))
        if system is not None:
            header = [self.im_start_id] + self._text(f"system\n{system}") + [self.im_end_id] + self._text("\n")
            input_ids += header
            labels += [IGNORE_INDEX] * len(header)
        for message in messages:
            head = [self.im_start_id] + self._text(f"{message['role']}\n")
            body = self._content(message["content"], cursor)
            tail = [self.im_end_id]
            newline = self._text("\n")
            input_ids += head + body + tail + newline
            if message["role"] == "assistant":
                labels += [IGNORE_INDEX] * len(head) + body + tail + [IGNORE_INDEX] * len(newline)
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(body) + len(tail) + len(newline))
        if cursor.images != len(image_tokens):
            raise TemplateError(
                f"{len(image_tokens)} image(s) given but the conversation has {cursor.images} "
                f"{IMAGE_PLACEHOLDER} placeholder(s): add one {IMAGE_PLACEHOLDER} per image"
            )
        if cursor.videos != len(video_tokens):
            raise TemplateError(
                f"{len(video_tokens)} video(s) given but the conversation has {cursor.videos} "
                f"{VIDEO_PLACEHOLDER} placeholder(s): add one {VIDEO_PLACEHOLDER} per entry of \"videos\", in order"
            )
        if add_generation_prompt:
            prompt = [self.im_start_id] + self._text("assistant\n")
            input_ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
        if max_length is not None and len(input_ids) > max_length:
            raise SampleTooLongError(len(input_ids), max_length, int(sum(image_tokens)) + int(sum(video_tokens)))
        return EncodedConversation(input_ids=input_ids, labels=labels)
