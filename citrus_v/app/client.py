"""The page's connection to ``citrus-v deploy``: the official ``openai`` client, and the answer's ``grounding``
(COCO-RLE masks, boxes) decoded into :mod:`citrus_v.infer.results` types."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..infer.results import Box, MaskResult


@dataclass
class ApiSettings:
    """Where the server is: its ``/v1`` URL, its API key and the model name (default: its first model)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = 300.0


@dataclass
class Reply:
    """The server's answer to one question about one picture."""

    content: str  # the whole answer text, [SEG] tokens and <think> part included
    reasoning: str | None
    masks: list[MaskResult] = field(default_factory=list)  # ordered by the [SEG] they belong to
    boxes: list[Box] = field(default_factory=list)
    grounding: dict[str, Any] | None = None  # the raw object, for the page's JSON view


class ApiClient:
    """Asks the server through the official ``openai`` client."""

    def __init__(self, settings: ApiSettings) -> None:
        import openai

        self.settings = settings
        self.client = openai.OpenAI(
            base_url=settings.base_url, api_key=settings.api_key or "none", timeout=settings.timeout, max_retries=0
        )
        self._model = settings.model

    @property
    def model(self) -> str:
        if self._model is None:
            models = self.client.models.list().data
            if not models:
                raise RuntimeError(f"the server at {self.settings.base_url} lists no model")
            self._model = models[0].id
        return self._model

    def ask(self, image: Image.Image, query: str) -> Reply:
        """Send ``image`` (as a PNG ``data:`` URL) and ``query``; return the answer with its masks and boxes."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = self._chat({"type": "image_url", "image_url": {"url": url}}, query)
        return Reply(reply.content, reply.reasoning, *decode_grounding(reply.grounding, image.size), reply.grounding)

    def ask_volume(self, url: str, query: str) -> Reply:
        """Send a whole volume or clip (a ``data:`` URL of its file) as one ``video_url`` part and ``query``.

        The answer's per-frame masks stay in ``grounding``: only the page knows the frames they belong to
        (:func:`citrus_v.app.volume_answer.decode_volume_grounding` reads them)."""
        return self._chat({"type": "video_url", "video_url": {"url": url}}, query)

    def _chat(self, media_part: dict[str, Any], query: str) -> Reply:
        """One user turn (the media part, then the question); the answer's text, reasoning and raw grounding."""
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": [media_part, {"type": "text", "text": query}]}],
        )
        message = reply.choices[0].message
        extra = message.model_extra or {}
        return Reply(message.content or "", extra.get("reasoning_content"), grounding=extra.get("grounding") or None)


def decode_grounding(grounding: dict[str, Any] | None, size: tuple[int, int]) -> tuple[list[MaskResult], list[Box]]:
    """Masks (ordered by their ``[SEG]``) and boxes of a ``grounding`` object, checked against the picture's
    ``(width, height)``; a malformed mask raises ``ValueError`` naming it."""
    from ..media import MedicalImageError, rle_to_mask

    if not grounding:
        return [], []
    masks = []
    for position, item in enumerate(grounding.get("masks") or []):
        try:
            mask = rle_to_mask(item["segmentation"])
        except (KeyError, TypeError, MedicalImageError) as err:
            raise ValueError(f"the server's mask {position} in 'grounding.masks' is not valid COCO RLE: {err}") from err
        if mask.shape != (size[1], size[0]):
            raise ValueError(
                f"the server's mask {position} is {mask.shape[1]}x{mask.shape[0]} pixels but the picture sent is "
                f"{size[0]}x{size[1]}: the server answered about another image"
            )
        index = int(item.get("index", position))
        masks.append(MaskResult(mask=mask, score=float(item.get("score", 0.0)), label=item.get("label"), index=index))
    masks.sort(key=lambda m: m.index)
    boxes = [Box(*(float(v) for v in b["bbox_2d"]), label=b.get("label") or "") for b in grounding.get("boxes") or []]
    return masks, boxes
