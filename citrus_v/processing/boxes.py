"""Boxes: Qwen2.5-VL's convention, formatting, parsing, and the one original <-> model coordinate conversion.

The model reads and writes **absolute pixel coordinates of the smart-resized image** (the size the Qwen2-VL
image processor resizes to: multiples of ``patch_size × merge_size`` within ``min_pixels``/``max_pixels``).
Answers are a JSON list ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` in a ```json fence; the older
``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` form is parsed too.

Every conversion between the original image and the model's coordinates goes through :class:`BoxScaler`,
once per direction: ``to_model`` rounds to whole model pixels, ``to_original`` gives original pixels; a
model-space box survives ``to_original`` then ``to_model`` exactly, and an original box comes back within
half a model pixel. The box type itself is :class:`citrus_v.media.boxes.Box` (re-exported here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..media.boxes import Box
from ..tokens import BOX_END, BOX_START, REF_END, REF_START

DETECTION_PROMPT = "Locate the {}, output its bbox coordinates using JSON format."

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TOKEN_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>\s*\(\s*(?P<x1>-?[\d.]+)\s*,\s*(?P<y1>-?[\d.]+)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?[\d.]+)\s*,\s*(?P<y2>-?[\d.]+)\s*\)\s*<\|box_end\|>",
    re.DOTALL,
)


def model_size(
    width: int, height: int, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2
) -> tuple[int, int]:
    """``(width, height)`` of the smart-resized image the model sees (the same function the processor uses)."""
    resized_h, resized_w = smart_resize(
        height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return int(resized_w), int(resized_h)


def scale_coordinate(value: float, source: int, target: int) -> int:
    """One coordinate from a ``source``-pixel side to a ``target``-pixel side, in whole target pixels.

    Computed as ms-swift's ``Template.normalize_bbox`` does (``int(round(x / width * resized_width))``, Python's
    round-half-to-even), so that a row's boxes land on the same model pixels here and there.
    """
    return int(round(value / source * target))


@dataclass(frozen=True)
class BoxScaler:
    """Converts boxes between an original image and the model's smart-resized image, both ways."""

    original: tuple[int, int]  # (width, height)
    model: tuple[int, int]  # (width, height)

    @classmethod
    def for_image(
        cls, width: int, height: int, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2
    ) -> BoxScaler:
        """The scaler for a ``width × height`` image under the given smart-resize bounds."""
        return cls((int(width), int(height)), model_size(width, height, min_pixels, max_pixels, patch_size, merge_size))

    @classmethod
    def for_processor(cls, processor, width: int, height: int) -> BoxScaler:
        """The scaler matching a :class:`~citrus_v.processing.processor.CitrusVProcessor`'s image bounds."""
        image_processor = processor.image_processor
        return cls.for_image(
            width,
            height,
            processor.min_pixels,
            processor.max_pixels,
            int(image_processor.patch_size),
            int(image_processor.merge_size),
        )

    def _scale(self, box: Box, source: tuple[int, int], limit: tuple[int, int], rounded: bool) -> Box:
        sides = (source[0], source[1], source[0], source[1])
        targets = (limit[0], limit[1], limit[0], limit[1])
        if rounded:
            values = [float(scale_coordinate(v, s, t)) for v, s, t in zip(box.xyxy, sides, targets, strict=True)]
        else:
            values = [v / s * t for v, s, t in zip(box.xyxy, sides, targets, strict=True)]
        width, height = limit
        x1, y1, x2, y2 = values
        clamp = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
        return Box(clamp(x1, width), clamp(y1, height), clamp(x2, width), clamp(y2, height), box.label)

    def to_model(self, box: Box, rounded: bool = True) -> Box:
        """Original-image pixels -> model pixels (whole pixels unless ``rounded=False``), clamped to the image."""
        return self._scale(box, self.original, self.model, rounded)

    def to_original(self, box: Box, rounded: bool = False) -> Box:
        """Model pixels -> original-image pixels, clamped to the image."""
        return self._scale(box, self.model, self.original, rounded)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 2)


def format_boxes(boxes: Iterable[Box]) -> str:
    """The upstream answer: a ```json fence holding ``[{"bbox_2d": [x1,y1,x2,y2],"label": "..."}]``."""
    lines = [
        json.dumps({"bbox_2d": [_number(v) for v in box.xyxy]}, separators=(",", ":"))[:-1]
        + f',"label": {json.dumps(box.label, ensure_ascii=False)}}}'
        for box in boxes
    ]
    return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"


def format_box_tokens(boxes: Iterable[Box]) -> str:
    """The Qwen2-VL token form: ``<|object_ref_start|>label<|object_ref_end|>``, then
    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``."""
    parts = []
    for box in boxes:
        x1, y1, x2, y2 = (_number(v) for v in box.xyxy)
        ref = f"{REF_START}{box.label}{REF_END}" if box.label else ""
        parts.append(f"{ref}{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}")
    return "".join(parts)


def _boxes_from_json(value: object) -> list[Box]:
    items = value if isinstance(value, list) else [value]
    boxes = []
    for item in items:
        if not isinstance(item, dict):
            continue
        coords = item.get("bbox_2d", item.get("bbox"))
        if not isinstance(coords, Sequence) or len(coords) != 4:
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in coords)
        except (TypeError, ValueError):
            continue
        boxes.append(Box(x1, y1, x2, y2, str(item.get("label", ""))))
    return boxes


def parse_boxes(text: str) -> list[Box]:
    """Every box in a model answer: JSON (fenced or bare) with ``bbox_2d``, and ``<|box_start|>`` tokens.

    Malformed parts are skipped; an answer without boxes gives an empty list.
    """
    boxes: list[Box] = []
    fenced = _FENCE.findall(text)
    if fenced:
        candidates = fenced
    else:  # bare JSON: the outermost list, else the outermost object; the first that holds boxes
        candidates = []
        for opening, closing in (("[", "]"), ("{", "}")):
            start, end = text.find(opening), text.rfind(closing)
            if start != -1 and end > start:
                candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            found = _boxes_from_json(json.loads(candidate))
        except json.JSONDecodeError:
            continue
        boxes += found
        if found and not fenced:
            break
    for match in _TOKEN_BOX.finditer(text):
        boxes.append(
            Box(
                float(match["x1"]),
                float(match["y1"]),
                float(match["x2"]),
                float(match["y2"]),
                (match["label"] or "").strip(),
            )
        )
    return boxes


def parse_boxes_to_original(text: str, image_size: tuple[int, int], processor) -> list[Box]:
    """Every box in a model answer, mapped once from model pixels to the original image (``(width, height)``)."""
    scaler = BoxScaler.for_processor(processor, *image_size)
    return [scaler.to_original(box) for box in parse_boxes(text)]
