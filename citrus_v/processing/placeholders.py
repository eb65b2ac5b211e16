"""ms-swift's grounding placeholders, ``<ref-object>`` and ``<bbox>``, written as each template writes them.

A row in ms-swift's format names its objects once (``"objects": {"ref": [...], "bbox": [[x1, y1, x2, y2], ...]}``,
original-image pixels) and marks where they go in the text; the placeholders are filled in order, across
the whole conversation. Coordinates become absolute pixels of the smart-resized image (ms-swift's
``norm_bbox='none'``, which both templates below use): ``int(round(x / width * resized_width))``, as
ms-swift's ``Template.normalize_bbox`` computes them. A row without an image keeps its coordinates as given.

Styles (:data:`GROUNDING_STYLES`):

``citrus_v`` (default)
    upstream Citrus-V's ``citrus_v`` template, which the released weights were trained with:
    ``<ref-object>`` -> ``<|object_ref_start|>ref<|object_ref_end|>``; ``<bbox>`` -> a fenced JSON list
    ``[{"bbox_2d": [x1,y1,x2,y2],"label": "ref"}]`` (``json.dumps(..., separators=(',', ': '))``, one object
    per line). Where a message holds several ``<bbox>``, the first writes all of that message's boxes in one
    list and the others nothing, as upstream does. Three upstream defects are not copied: its single-box path
    scales the coordinates a second time (truncating with ``int``); its several-box path labels every box
    with the first ``ref``; and it gathers the boxes of the whole conversation at the first ``<bbox>``, which
    leaves the later turns of a multi-turn row empty. Here each box is scaled once, carries its own ``ref``
    and stays in its own message. Rows that write the JSON
    themselves (``{"bbox_2d": <bbox>, "label": "<ref-object>"}``, the Qwen cookbook's form) get the bare
    values there — the list in the same spelling and the label JSON-escaped — where upstream would nest a
    fenced block inside the JSON.
``qwen2_5_vl``
    ms-swift's ``qwen2_5_vl`` template with its default ``QWENVL_BBOX_FORMAT=legacy``:
    ``<|object_ref_start|>ref<|object_ref_end|>`` and ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``.
``qwen2_5_vl_new``
    the same template with ``QWENVL_BBOX_FORMAT=new``: the plain ``ref`` and Python's list spelling
    ``[x1, y1, x2, y2]``.

``bench/template_parity.py`` renders the same rows with ms-swift itself and compares the bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..tokens import BBOX_PLACEHOLDER, BOX_END, BOX_START, REF_END, REF_PLACEHOLDER, REF_START
from .boxes import scale_coordinate

GROUNDING_STYLES = ("citrus_v", "qwen2_5_vl", "qwen2_5_vl_new")
DEFAULT_GROUNDING_STYLE = "citrus_v"
UNLABELLED = "object"  # upstream's label for a box without a ref

Number = int | float
_PLACEHOLDER = re.compile(f"({re.escape(REF_PLACEHOLDER)}|{re.escape(BBOX_PLACEHOLDER)})")


class PlaceholderError(ValueError):
    """Placeholders that do not match the row's ``objects`` (more placeholders than entries, unknown style)."""


@dataclass
class _Cursor:
    """How far the conversation has used ``objects.ref`` and ``objects.bbox``."""

    ref: int = 0
    box: int = 0
    bare_boxes: int = 0  # bare <bbox> placeholders in the current message (citrus_v style)
    written: bool = False  # the current message's first bare <bbox> wrote all of them


def model_box(box: Sequence[Number], original: tuple[int, int] | None, model: tuple[int, int] | None) -> list[Number]:
    """One ``objects.bbox`` entry in model pixels (ms-swift's ``normalize_bbox``); as given without an image."""
    if original is None or model is None:
        return list(box)
    return [scale_coordinate(value, original[k % 2], model[k % 2]) for k, value in enumerate(box)]


def _json_list(values: Sequence[Number]) -> str:
    return json.dumps(list(values), separators=(",", ": "))


def citrus_json_block(boxes: Sequence[Sequence[Number]], labels: Sequence[str]) -> str:
    """Upstream Citrus-V's fenced answer: one ``{"bbox_2d": [...],"label": "..."}`` per line."""
    lines = [
        json.dumps({"bbox_2d": list(box), "label": label}, ensure_ascii=False, separators=(",", ": "))
        for box, label in zip(boxes, labels, strict=True)
    ]
    return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"


def _inside_json_value(text: str, start: int, end: int, kind: str) -> bool:
    """Whether the row itself writes the JSON around this placeholder (``"bbox_2d": <bbox>``,
    ``"label": "<ref-object>"``)."""
    before = text[:start].rstrip()
    if kind == BBOX_PLACEHOLDER:
        return before.endswith(":")
    return before.endswith('"') and text[end : end + 1] == '"' and before[:-1].rstrip().endswith(":")


def _ref_text(ref: str, style: str, embedded: bool) -> str:
    if style == "qwen2_5_vl_new":
        return ref
    if style == "citrus_v" and embedded:
        return json.dumps(ref, ensure_ascii=False)[1:-1]
    return f"{REF_START}{ref}{REF_END}"


def _box_text(
    boxes: list[list[Number]], refs: list[str], cursor: _Cursor, style: str, embedded: bool
) -> str:
    if style == "qwen2_5_vl":
        box = boxes[cursor.box]
        cursor.box += 1
        corners = ",".join(f"({x},{y})" for x, y in zip(box[::2], box[1::2], strict=True))
        return f"{BOX_START}{corners}{BOX_END}"
    if style == "qwen2_5_vl_new":
        cursor.box += 1
        return str(boxes[cursor.box - 1])
    if embedded:
        cursor.box += 1
        return _json_list(boxes[cursor.box - 1])
    chosen = list(range(cursor.box, cursor.box + cursor.bare_boxes))  # the first of several writes them all
    if chosen[-1] >= len(boxes):
        raise PlaceholderError(
            f"{cursor.bare_boxes} {BBOX_PLACEHOLDER} placeholders in one message but only {len(boxes) - cursor.box} "
            f"objects.bbox entries left: give one box per {BBOX_PLACEHOLDER}, in order"
        )
    cursor.box += len(chosen)
    cursor.written = True
    labels = [refs[k] if k < len(refs) else UNLABELLED for k in chosen]
    return citrus_json_block([boxes[k] for k in chosen], labels)


def _count_bare_boxes(text: str) -> int:
    """``<bbox>`` placeholders of one message that the row does not write inside JSON itself."""
    matches = (m for m in _PLACEHOLDER.finditer(text) if m.group(0) == BBOX_PLACEHOLDER)
    return sum(1 for m in matches if not _inside_json_value(text, m.start(), m.end(), BBOX_PLACEHOLDER))


def render_placeholders(
    messages: Sequence[dict],
    refs: Sequence[str],
    boxes: Sequence[Sequence[Number]],
    original: tuple[int, int] | None = None,
    model: tuple[int, int] | None = None,
    style: str = DEFAULT_GROUNDING_STYLE,
) -> list[dict]:
    """Copies of ``messages`` with ``<ref-object>`` / ``<bbox>`` filled from ``refs`` / ``boxes`` in order.

    ``original`` and ``model`` are the ``(width, height)`` of the first image and of its smart-resized
    version (both None without an image: coordinates are written as given). Raises
    :class:`PlaceholderError` when a placeholder has no entry left (ms-swift would leave the placeholder
    in the text and train on it).
    """
    if style not in GROUNDING_STYLES:
        raise PlaceholderError(f"unknown grounding style {style!r}; use one of {', '.join(GROUNDING_STYLES)}")
    refs = [str(ref) for ref in refs]
    for k, box in enumerate(boxes):
        if not all(math.isfinite(value) for value in box):
            raise PlaceholderError(f"objects.bbox[{k}] {list(box)} has a coordinate that is not a finite number")
    scaled = [model_box(box, original, model) for box in boxes]
    cursor = _Cursor()
    rendered = []
    for message in messages:
        message = dict(message)
        text = message.get("content")
        if isinstance(text, str) and (REF_PLACEHOLDER in text or BBOX_PLACEHOLDER in text):
            message["content"] = _render_text(text, refs, scaled, cursor, style)
        rendered.append(message)
    return rendered


def _render_text(text: str, refs: list[str], boxes: list[list[Number]], cursor: _Cursor, style: str) -> str:
    out, pos = [], 0
    cursor.bare_boxes, cursor.written = (_count_bare_boxes(text) if style == "citrus_v" else 0), False
    for match in _PLACEHOLDER.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        kind = match.group(0)
        embedded = _inside_json_value(text, match.start(), match.end(), kind)
        if kind == REF_PLACEHOLDER:
            if cursor.ref >= len(refs):
                raise PlaceholderError(
                    f"{REF_PLACEHOLDER} number {cursor.ref + 1} has no objects.ref entry ({len(refs)} given): give "
                    f"one ref per {REF_PLACEHOLDER}, in order"
                )
            out.append(_ref_text(refs[cursor.ref], style, embedded))
            cursor.ref += 1
        elif style == "citrus_v" and not embedded and cursor.written:
            continue  # the first of the message's bare <bbox> wrote them all
        else:
            if cursor.box >= len(boxes):
                raise PlaceholderError(
                    f"{BBOX_PLACEHOLDER} number {cursor.box + 1} has no objects.bbox entry ({len(boxes)} given): "
                    f"give one box per {BBOX_PLACEHOLDER}, in order"
                )
            out.append(_box_text(boxes, refs, cursor, style, embedded))
    out.append(text[pos:])
    return "".join(out)
