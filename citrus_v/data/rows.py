"""Dataset rows: the ms-swift JSONL format, read line by line, checked for shape, resolved and rendered.

A row::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "...<image>..."}, ...],
     "images": ["scan.png", "ct.dcm#window=ct-abdomen", "vol.nii.gz#slice=12", ...],
     "videos": ["ct.nii.gz#window=ct-abdomen", "series_folder/", "cine.dcm", "clip.mp4", ...],  # one per <video>
     "masks": ["lesion.png", {"size": [h, w], "counts": "..."}, ...],   # one per [SEG], in order
     "objects": {"ref": ["liver"], "bbox": [[x1, y1, x2, y2]]},         # original-image pixels
     "system": "optional system prompt"}

``videos`` (ms-swift's field) holds volumes and clips, one per ``<video>`` placeholder in the user text, as
:func:`~citrus_v.media.volumes.read_volume` reads them (a whole stack: no ``slice=``/``frame=``). In a row with
images, ``masks`` are 2-D masks of the first image; in a row with videos and no image they are 3-D masks of the
first video: label volumes with one slice per frame, e.g. ``labels.nii.gz#label=3`` (the voxels equal to 3).

Extra keys (``task``, ``meta``, ``id``, ...) are kept. Paths are relative to the JSONL file's folder unless
absolute. A training row may also carry annotations that only training-only objectives read (a lesion mask,
lesion centres, a character map: :mod:`citrus_v.objectives.annotations`); they are checked here and ignored
elsewhere. As in ms-swift, ``<ref-object>`` and ``<bbox>`` in a message are placeholders filled from
``objects`` in order, written as the chosen template writes them (:mod:`citrus_v.processing.placeholders`),
with boxes in the model's coordinates when the row is rendered for a processor.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..media.boxes import Box
from ..objectives import annotations
from ..objectives.annotations import AnnotationError
from ..processing.boxes import BoxScaler
from ..processing.placeholders import DEFAULT_GROUNDING_STYLE, PlaceholderError, render_placeholders
from ..tokens import BBOX_PLACEHOLDER, IMAGE_PLACEHOLDER, SEG_TOKEN, STRUCTURAL_TOKENS, VIDEO_PLACEHOLDER

logger = logging.getLogger("citrus_v.data")

ROLES = ("system", "user", "assistant")

# refused in a row's text as the server refuses them in a request
RESERVED_TOKENS = STRUCTURAL_TOKENS


class RowProblem(ValueError):
    """Why a row cannot be used: ``reason`` is a short key for counting, the message says the fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RowIssue:
    """A rejected row: where (``file:line``), why (``reason``) and what to do (``message``)."""

    file: str
    line: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.reason}] {self.message}"


class DataError(ValueError):
    """Raised in strict mode on the first bad row, carrying its :class:`RowIssue`."""

    def __init__(self, issue: RowIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


@dataclass
class RowRecord:
    """One parsed row and where it came from."""

    file: Path
    line: int
    row: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class SkipCounter:
    """Counts and logs skipped rows by reason; in ``strict`` mode the first one raises :class:`DataError`."""

    strict: bool = False
    issues: list[RowIssue] = field(default_factory=list)
    keep: int = 1000  # issues kept for the report; all are counted

    def __post_init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, issue: RowIssue) -> None:
        self.counts[issue.reason] += 1
        if len(self.issues) < self.keep:
            self.issues.append(issue)
        logger.warning("skipped row %s", issue)
        if self.strict:
            raise DataError(issue)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter) -> None:
        self.counts.update(other.counts)
        self.issues.extend(other.issues[: max(0, self.keep - len(self.issues))])

    def summary(self) -> str:
        """``skipped N row(s): reason A, reason B`` (or that nothing was skipped)."""
        if not self.total:
            return "skipped 0 rows"
        parts = ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items()))
        return f"skipped {self.total} row(s): {parts}"


def read_jsonl(path: str | Path) -> Iterator[RowRecord | RowIssue]:
    """Yield each non-blank line of a JSONL file as a :class:`RowRecord`, or a :class:`RowIssue` if not JSON."""
    path = Path(path)
    try:
        if not path.is_file():
            yield RowIssue(str(path), 0, "missing_file", f"dataset file not found: {path}")
            return
        # read bytes: one line that is not UTF-8 is a bad row, not the end of the whole file
        handle = open(path, "rb")
    except (OSError, ValueError) as err:  # no permission, a name too long, a NUL byte in the path
        yield RowIssue(str(path), 0, "unreadable_file", f"the dataset file cannot be opened ({err})")
        return
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RowIssue(
                    str(path), number, "invalid_encoding", f"byte {raw[err.start]:#04x} at column {err.start + 1} is "
                    "not UTF-8. Fix: save the file as UTF-8"
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield RowIssue(
                    str(path), number, "invalid_json", f"invalid JSON at column {err.colno}: {err.msg}. Fix: one JSON "
                    "object per line"
                )
                continue
            if not isinstance(row, dict):
                yield RowIssue(str(path), number, "schema", f"a row must be a JSON object, got {type(row).__name__}")
                continue
            yield RowRecord(path, number, row)


def check_schema(row: Mapping[str, Any], require_answer: bool = True) -> None:
    """Raise :class:`RowProblem` (reason ``schema``) when a row does not have the ms-swift shape."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowProblem("schema", "'messages' must be a non-empty list of {'role', 'content'} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowProblem("schema", f"messages[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RowProblem("schema", f"messages[{index}] has role {message['role']!r}; use one of {ROLES}")
        if not isinstance(message["content"], str):
            raise RowProblem("schema", f"messages[{index}].content must be a string")
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("schema", "the row has no assistant message: there is nothing to train on")
    _check_turns(messages, require_answer)
    _check_text(messages, row.get("system"))
    for key in ("images", "videos", "masks"):
        value = row.get(key)
        if value is not None and not isinstance(value, list):
            raise RowProblem("schema", f"'{key}' must be a list")
        for k, item in enumerate(value or []):
            if not isinstance(item, (str, dict)):
                raise RowProblem("schema", f"{key}[{k}] must be a path string or an object")
    try:
        annotations.check_schema(row)
    except AnnotationError as err:
        raise RowProblem(err.reason, str(err)) from err
    if row.get("system") is not None and not isinstance(row["system"], str):
        raise RowProblem("schema", "'system' must be a string")
    objects = row.get("objects")
    if objects is not None:
        if not isinstance(objects, dict):
            raise RowProblem("schema", "'objects' must be an object {'ref': [...], 'bbox': [[x1,y1,x2,y2], ...]}")
        refs, boxes = objects.get("ref", []), objects.get("bbox", [])
        if not isinstance(refs, list) or not isinstance(boxes, list):
            raise RowProblem("schema", "objects.ref and objects.bbox must be lists")
        for k, box in enumerate(boxes):
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise RowProblem("schema", f"objects.bbox[{k}] must be [x1, y1, x2, y2] numbers")
        _check_object_frame(objects)
    has_user = any(m["role"] == "user" for m in messages)
    for key, placeholder, reason in (("images", IMAGE_PLACEHOLDER, "image_count"),
                                     ("videos", VIDEO_PLACEHOLDER, "video_count")):
        placeholders = count_text(row, placeholder)
        count = len(row.get(key) or [])
        # ms-swift convention: with no placeholder at all the images (videos) go before the first user message
        if placeholders != count and not (placeholders == 0 and has_user):
            fix = "" if has_user else ", or a user message for them to go before"
            raise RowProblem(
                reason,
                f"{placeholders} {placeholder} placeholder(s) for {count} {key[:-1]}(s) in \"{key}\": give one "
                f"{placeholder} per entry, in order{fix}",
            )


def _check_turns(messages: list[dict[str, Any]], require_answer: bool) -> None:
    """The conversation rules the server applies to a request: system messages first, then user and assistant
    turns alternating; a training row also ends with the assistant's reply (the part that is learnt)."""
    turns = [(k, m["role"]) for k, m in enumerate(messages) if m["role"] != "system"]
    for index, message in enumerate(messages):
        if message["role"] == "system" and turns and index > turns[0][0]:
            raise RowProblem(
                "turn_order", f"messages[{index}] is a system message after the conversation began: put system "
                "messages first (or use the row's 'system' key)"
            )
    for (_, previous), (index, role) in zip(turns, turns[1:], strict=False):
        if role == previous:
            raise RowProblem(
                "turn_order", f"messages[{index}] is a second {role} message in a row: user and assistant messages "
                "must alternate. Fix: merge the two messages into one"
            )
    if require_answer and turns and turns[-1][1] == "user":
        raise RowProblem(
            "turn_order", f"messages[{turns[-1][0]}] is a user message with no assistant reply after it: there is "
            "nothing to learn from it. Fix: add the reply or drop the message"
        )


def _check_text(messages: list[dict[str, Any]], system: Any) -> None:
    """No typed special tokens (they would forge turns or image slots, as the server refuses them), images only
    in user messages, and text that is valid Unicode (no lone surrogates from ``\\ud800`` escapes)."""
    texts = [(f"messages[{k}].content", m["content"], m["role"]) for k, m in enumerate(messages)]
    if isinstance(system, str):
        texts.append(("system", system, "system"))
    for where, text, role in texts:
        token = next((t for t in RESERVED_TOKENS if t in text), None)
        if token is not None:
            raise RowProblem(
                "reserved_token", f"{where} contains the special token {token}, which only the chat template may "
                "write. Fix: remove it from the text"
            )
        for placeholder, reason, what in ((IMAGE_PLACEHOLDER, "image_count", "image"),
                                          (VIDEO_PLACEHOLDER, "video_count", "video")):
            if role != "user" and placeholder in text:
                raise RowProblem(
                    reason, f"{where}: {role} messages cannot hold {what}s ({placeholder}); put each {what} in a "
                    "user message"
                )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RowProblem(
                "invalid_text", f"{where} holds {text[err.start]!r} at character {err.start}, a lone surrogate that "
                "is not valid Unicode. Fix: write the character itself (or its surrogate pair)"
            ) from err


def _check_object_frame(objects: Mapping[str, Any]) -> None:
    """ms-swift's ``objects.bbox_type`` and ``objects.image_id``: only what the renderer places correctly
    (pixels of the first image) is accepted, never silently misplaced."""
    bbox_type = objects.get("bbox_type") or "real"
    if bbox_type != "real":
        raise RowProblem(
            "schema", f"objects.bbox_type {bbox_type!r} is not supported: give boxes in pixels of the first image "
            "('real'; multiply 'norm1' coordinates by the image's width and height)"
        )
    image_ids = objects.get("image_id") or []
    if not isinstance(image_ids, list) or any(i != 0 for i in image_ids):
        raise RowProblem(
            "schema", f"objects.image_id {image_ids!r}: boxes can refer to the first image only (image_id 0)"
        )


def count_text(row: Mapping[str, Any], needle: str, role: str | None = None) -> int:
    """Occurrences of ``needle`` in the row's messages (optionally one role only)."""
    return sum(
        str(m.get("content", "")).count(needle)
        for m in row.get("messages", [])
        if isinstance(m, dict) and (role is None or m.get("role") == role)
    )


def count_seg(row: Mapping[str, Any]) -> int:
    """Number of ``[SEG]`` tokens in the row's text (each needs one mask)."""
    return count_text(row, SEG_TOKEN)


def object_boxes(row: Mapping[str, Any]) -> list[Box]:
    """The row's ``objects`` as boxes in original-image pixels (labels from ``objects.ref`` in order)."""
    objects = row.get("objects") or {}
    refs = list(objects.get("ref") or [])
    return [
        Box(*map(float, box), label=str(refs[k]) if k < len(refs) else "")
        for k, box in enumerate(objects.get("bbox") or [])
    ]


def render_objects(
    row: Mapping[str, Any], scaler: BoxScaler | None, style: str = DEFAULT_GROUNDING_STYLE
) -> list[dict[str, str]]:
    """Messages with ``<ref-object>`` / ``<bbox>`` filled from ``objects`` in order, as ms-swift's template
    ``style`` writes them (:mod:`citrus_v.processing.placeholders`; default: upstream Citrus-V's ``citrus_v``).

    Boxes go to model pixels through ``scaler`` (the first image and its smart-resized size); without a
    scaler the original coordinates are written.
    """
    objects = row.get("objects")
    if not objects:
        return [dict(m) for m in row["messages"]]
    sizes = (scaler.original, scaler.model) if scaler is not None else (None, None)
    try:
        return render_placeholders(
            row["messages"], list(objects.get("ref") or []), list(objects.get("bbox") or []), *sizes, style=style
        )
    except PlaceholderError as err:
        raise RowProblem("objects", str(err)) from err


def row_task(row: Mapping[str, Any]) -> str:
    """The row's task: its ``task`` key, else guessed from the answer (segmentation, detection, cot, vqa)."""
    if isinstance(row.get("task"), str):
        return row["task"]
    answer = " ".join(str(m.get("content", "")) for m in row.get("messages", []) if m.get("role") == "assistant")
    if SEG_TOKEN in answer:
        return "segmentation"
    if "bbox_2d" in answer or "<|box_start|>" in answer or BBOX_PLACEHOLDER in answer:
        return "detection"
    if "<think>" in answer:
        return "cot"
    return "vqa" if row.get("images") or row.get("videos") else "text"


def row_modality(row: Mapping[str, Any]) -> str:
    """``meta.modality`` (or ``modality``) of the row, else ``unknown``."""
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    value = meta.get("modality", row.get("modality"))
    return str(value) if value else "unknown"


def iter_rows(paths: Sequence[str | Path], skips: SkipCounter | None = None) -> Iterator[RowRecord]:
    """Parsed rows of several JSONL files; bad JSON and schema problems are recorded in ``skips``."""
    skips = skips if skips is not None else SkipCounter()
    for path in paths:
        for item in read_jsonl(path):
            if isinstance(item, RowIssue):
                skips.record(item)
                continue
            try:
                check_schema(item.row)
            except RowProblem as problem:
                skips.record(RowIssue(str(item.file), item.line, problem.reason, str(problem)))
                continue
            yield item
