"""Where answers come from: our model in-process, or any OpenAI-compatible endpoint.

Both backends get the same RGB images and the same prompt and return a :class:`ModelOutput` with the
answer text, boxes and masks in original-image pixels, so the scoring code cannot tell them apart.

- :class:`InProcessBackend` runs :class:`~citrus_v.infer.predictor.CitrusVPredictor` (greedy decoding).
- :class:`OpenAIBackend` uses the official ``openai`` client: images go as PNG ``data:`` URLs (lossless, so
  the server sees the same pixels), ``temperature=0`` and the run's seed. Boxes and masks come from the
  ``grounding`` object of ``citrus-v deploy`` (masks as COCO RLE); an endpoint without it gets boxes parsed
  from the answer text, read as ``--box_format`` says (``pixels``: original-image pixels; ``qwen``:
  Qwen2.5-VL's smart-resized pixels; ``norm1000``: 0–1000 of the image), and no masks. The client retries
  connection errors, 408/409/429 and 5xx answers ``retries`` times with backoff and gives up after
  ``timeout`` seconds per request; the sample is then marked failed and the run goes on.

A sample about a volume or clip (``videos``) is asked with its video (in-process: the reference itself; over
the API: a ``video_url`` part with the file's bytes) and answered with one ``[N, H, W]`` mask stack per
``[SEG]`` on the video's whole grid, in place of 2-D masks (:mod:`.backend_videos`).
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from . import backend_videos
from .samples import EvalSample

if TYPE_CHECKING:
    from ..infer.results import Prediction

logger = logging.getLogger(__name__)

BOX_FORMATS = ("pixels", "qwen", "norm1000")


@dataclass
class GenerationOptions:
    """Decoding settings shared by both backends (greedy unless ``temperature`` > 0)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


@dataclass
class ModelOutput:
    """One answer: text, boxes ``[x1, y1, x2, y2]`` and boolean masks ``[H, W]``, all in original pixels (for a
    sample about a volume or clip, ``masks`` holds one ``[N, H, W]`` stack per ``[SEG]`` on the video's grid)."""

    text: str
    boxes: list[list[float]] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    grounded: bool = True  # boxes/masks came from the model's grounding output (not parsed from text)


class Backend:
    """Answers samples; ``workers`` requests may run at once, each of up to ``batch_size`` samples."""

    workers: int = 1
    batch_size: int = 1

    def predict(
        self, samples: Sequence[EvalSample], images: Sequence[list[Image.Image]], options: GenerationOptions
    ) -> list[ModelOutput]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class InProcessBackend(Backend):
    """Our model in this process, ``batch_size`` samples per generation pass."""

    def __init__(self, predictor, batch_size: int = 1, name: str = "model") -> None:
        self.predictor = predictor
        self.batch_size = max(1, int(batch_size))
        self.name = name

    @classmethod
    def from_pretrained(cls, directory: str, device: str | None = None, batch_size: int = 1) -> InProcessBackend:
        """Load a model folder (``citrus-v build`` or training output)."""
        import torch

        from ..infer.predictor import CitrusVPredictor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(CitrusVPredictor.from_pretrained(directory, device=device), batch_size, str(directory))

    def predict(self, samples, images, options):
        from ..infer.predictor import Request

        requests = [
            Request(images=imgs, prompt=s.prompt, system=s.system, history=list(s.history),
                    videos=backend_videos.video_references(s))
            for s, imgs in zip(samples, images, strict=True)
        ]
        predictions = self.predictor.predict_batch(
            requests, max_new_tokens=options.max_new_tokens, temperature=options.temperature, seed=options.seed
        )
        return [self._output(s, p) for s, p in zip(samples, predictions, strict=True)]

    @staticmethod
    def _output(sample: EvalSample, prediction: Prediction) -> ModelOutput:
        """A prediction as a :class:`ModelOutput`: a video sample's masks are its volume masks' stacks on the
        video's grid (frames SAM 2 did not segment stay empty, and the predictor's note is logged)."""
        boxes = [[float(b.x1), float(b.y1), float(b.x2), float(b.y2)] for b in prediction.boxes]
        if not sample.videos:
            return ModelOutput(text=prediction.text, boxes=boxes,
                               masks=[np.asarray(m.mask, dtype=bool) for m in prediction.masks])
        for note in getattr(prediction, "notes", []):
            logger.warning("%s: %s", sample.where(), note)
        volume_masks = getattr(prediction, "volume_masks", [])
        stacks = (backend_videos.stacks_from_volume_masks(volume_masks, backend_videos.video_grid(sample))
                  if volume_masks else [])
        return ModelOutput(text=prediction.text, boxes=boxes, masks=stacks)

    def describe(self) -> dict[str, Any]:
        return {"backend": "in-process", "model": self.name, "batch_size": self.batch_size}


def png_data_url(image: Image.Image) -> str:
    """A lossless PNG ``data:`` URL of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def chat_messages(
    sample: EvalSample, images: Sequence[Image.Image], videos: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """OpenAI chat messages: system, earlier turns, then the prompt with each image (a PNG ``data:`` URL) and each
    video (``videos``: ``data:`` URLs) where its placeholder is. A kind whose placeholders do not match its count
    goes before the text, images first, as the processor places them."""
    messages: list[dict[str, Any]] = []
    if sample.system is not None:
        messages.append({"role": "system", "content": sample.system})
    for turn in sample.history:  # earlier turns' images and videos are not resent
        text = turn["content"].replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
        messages.append({"role": turn["role"], "content": text})
    media = {
        IMAGE_PLACEHOLDER: [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images],
        VIDEO_PLACEHOLDER: [{"type": "video_url", "video_url": {"url": url}} for url in videos],
    }
    pieces = _PLACEHOLDERS.split(sample.prompt)
    parts: list[dict[str, Any]] = []
    for tag, items in media.items():
        if pieces.count(tag) != len(items):  # no (or too few) placeholders: these go first
            parts += items
            pieces = [piece for piece in pieces if piece != tag]
            items.clear()
    queues = {tag: iter(items) for tag, items in media.items()}
    text = ""
    for piece in pieces:
        if piece in queues:
            if text:
                parts.append({"type": "text", "text": text})
            parts.append(next(queues[piece]))
            text = ""
        else:
            text += piece
    if text:
        parts.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": parts})
    return messages


class OpenAIBackend(Backend):
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint through the official client."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 4,
        retries: int = 2,
        timeout: float = 300.0,
        box_format: str = "pixels",
        min_pixels: int = 200704,
        max_pixels: int = 1003520,
    ) -> None:
        import openai

        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format {box_format!r}: choose from {', '.join(BOX_FORMATS)}")
        self.base_url = _v1(base_url)
        self.model = model
        self.workers = max(1, int(concurrency))
        self.retries, self.timeout = int(retries), float(timeout)
        self.box_format, self.min_pixels, self.max_pixels = box_format, int(min_pixels), int(max_pixels)
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "EMPTY", max_retries=self.retries, timeout=self.timeout
        )

    def predict(self, samples, images, options):
        return [self._one(sample, imgs, options) for sample, imgs in zip(samples, images, strict=True)]

    def _one(self, sample: EvalSample, images: list[Image.Image], options: GenerationOptions) -> ModelOutput:
        videos = [backend_videos.video_data_url(ref) for ref in backend_videos.video_references(sample)]
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=chat_messages(sample, images, videos),
            max_tokens=options.max_new_tokens,
            temperature=options.temperature,
            seed=options.seed,
        )
        if not reply.choices:
            raise RuntimeError("the endpoint answered without choices")
        message = reply.choices[0].message
        text = message.content or ""
        grounding = (message.model_extra or {}).get("grounding")
        if isinstance(grounding, dict):
            if sample.videos:
                return self._grounded_video(sample, text, grounding)
            return self._grounded(text, grounding, images)
        return ModelOutput(text=text, boxes=self._text_boxes(text, images), grounded=False)

    def _grounded(self, text: str, grounding: dict, images: list[Image.Image]) -> ModelOutput:
        from ..media import rle_to_mask

        size = grounding.get("image_size") or {}
        if images and (size.get("width"), size.get("height")) != images[0].size:
            raise RuntimeError(
                f"grounding.image_size {size} does not match the image sent ({images[0].size[0]}x{images[0].size[1]})"
            )
        boxes = [[float(v) for v in b["bbox_2d"]] for b in grounding.get("boxes") or []]
        masks = [rle_to_mask(m["segmentation"]) for m in sorted(grounding.get("masks") or [], key=lambda m: m["index"])]
        return ModelOutput(text=text, boxes=boxes, masks=masks, grounded=True)

    @staticmethod
    def _grounded_video(sample: EvalSample, text: str, grounding: dict) -> ModelOutput:
        """A video sample's answer: the grounding's per-frame RLE masks rebuilt into stacks on the video's grid
        (N, H, W from the video's headers here); no volume masks at all gives no stack."""
        boxes = [[float(v) for v in b["bbox_2d"]] for b in grounding.get("boxes") or []]
        for note in grounding.get("notes") or []:
            logger.warning("%s: %s", sample.where(), note)
        grid = backend_videos.video_grid(sample)
        backend_videos.check_video_size(grounding, grid)
        listed = backend_videos.grounding_volume_masks(grounding)
        stacks = backend_videos.stacks_from_grounding(listed, grid) if listed else []
        return ModelOutput(text=text, boxes=boxes, masks=stacks, grounded=True)

    def _text_boxes(self, text: str, images: list[Image.Image]) -> list[list[float]]:
        from ..processing.boxes import Box, BoxScaler, parse_boxes

        if not images:
            return []
        width, height = images[0].size
        boxes = parse_boxes(text)
        if self.box_format == "qwen":
            scaler = BoxScaler.for_image(width, height, self.min_pixels, self.max_pixels)
            boxes = [scaler.to_original(b) for b in boxes]
        elif self.box_format == "norm1000":
            boxes = [Box(b.x1 * width / 1000, b.y1 * height / 1000, b.x2 * width / 1000, b.y2 * height / 1000)
                     for b in boxes]
        return [b.xyxy for b in boxes]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai-api", "api": self.base_url, "served_model_name": self.model,
            "concurrency": self.workers, "retries": self.retries, "timeout_s": self.timeout,
            "box_format": self.box_format,
        }


def _v1(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL that already has a path is kept."""
    from urllib.parse import urlparse

    url = url.rstrip("/")
    return url + "/v1" if urlparse(url).path in ("", "/") else url
