"""Converters from public dataset layouts to Citrus-V rows (``citrus-v data convert --from FORMAT``).

Formats:
- ``mecovqa-g``: ``{id, image, conversations: [{from, value: "<image>\\n..."},
  {from, value: "<SEG><mask>path</mask>"}]}``
- ``medsegbench``: ``{id, images, masks, conversations, metadata: {dataset, region}}``
- ``detection``: JSONL ``{image, sentence, bbox: [x1, y1, x2, y2], width, height}`` (original pixels, or 0-1
  fractions of ``width``/``height``)
- ``vqa-rad``, ``slake``, ``pathvqa``: question/answer JSON (``image_name`` / ``img_name`` / ``image``;
  SLAKE keeps ``q_lang == "en"`` unless ``--lang all``)

Input may be a JSON array, an object holding one (``{"data": [...]}``), or JSONL. Image and mask paths are
taken relative to ``--image-root`` / ``--mask-root`` (default: the input file's folder) and written relative
to the output file's folder. Items that cannot be converted are skipped and counted with ``file:item``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..processing.boxes import DETECTION_PROMPT
from ..tokens import IMAGE_PLACEHOLDER, SEG_TOKEN
from .rows import RowIssue, RowProblem, SkipCounter

SEG_WITH_MASK = re.compile(r"<SEG>\s*<mask>(.*?)</mask>", re.DOTALL)
SEG_ANSWER = "Sure, it is [SEG]."
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DETECTION_ANSWER = '```json\n[\n{"bbox_2d": <bbox>,"label": "<ref-object>"}\n]\n```'


@dataclass
class ConvertContext:
    """Where paths come from and go to."""

    input_file: Path
    out_dir: Path
    image_root: Path
    mask_root: Path
    lang: str = "en"
    image_suffix: str = ".jpg"

    def image(self, name: str, root: Path | None = None) -> str:
        """A path from the source layout, rewritten relative to the output folder."""
        path = Path(name)
        if not path.is_absolute():
            path = (root or self.image_root) / path
        try:
            return Path(os.path.relpath(path, self.out_dir)).as_posix()
        except ValueError:  # another drive on Windows
            return path.as_posix()

    def mask(self, name: str) -> str:
        return self.image(name, self.mask_root)


@dataclass
class ConvertReport:
    written: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)

    def format(self) -> str:
        lines = [f"wrote {self.written} row(s); {self.skips.summary()}"]
        lines += [f"  {issue}" for issue in self.skips.issues[:50]]
        return "\n".join(lines)


def read_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line or item number, item)`` from a JSON array, ``{"data": [...]}``-style object, or JSONL file.

    Lines that are not JSON come back as ``(number, RowProblem)``.
    """
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        for index, item in enumerate(json.loads(text), start=1):
            yield index, item
        return
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            lists = [v for v in whole.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(i, dict) for i in lists[0]):
                for index, item in enumerate(lists[0], start=1):
                    yield index, item
                return
            yield 1, whole
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, RowProblem("invalid_json", f"invalid JSON at column {err.colno}: {err.msg}")


def _conversations(item: dict, ctx: ConvertContext) -> tuple[list[dict], list[str]]:
    """LLaVA-style ``conversations`` to messages; ``<SEG><mask>path</mask>`` -> ``[SEG]`` plus its mask path."""
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("schema", "'conversations' must be a non-empty list of {'from', 'value'}")
    messages, masks = [], []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn:
            raise RowProblem("schema", f"conversations[{k}] needs 'value'")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            role = "user" if k % 2 == 0 else "assistant"  # alternate when the speaker is not named
        text = str(turn["value"])
        masks += [m.strip() for m in SEG_WITH_MASK.findall(text)]
        text = SEG_WITH_MASK.sub(SEG_TOKEN, text).replace("<SEG>", SEG_TOKEN)
        if role == "assistant" and text.strip().rstrip(".") == SEG_TOKEN:
            text = SEG_ANSWER
        if role == "user":
            text = text.replace(f"{IMAGE_PLACEHOLDER}\n", IMAGE_PLACEHOLDER)
        messages.append({"role": role, "content": text})
    return messages, masks


def _ensure_image_placeholders(messages: list[dict], count: int) -> None:
    present = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if present == 0 and count:
        for message in messages:
            if message["role"] == "user":
                message["content"] = IMAGE_PLACEHOLDER * count + message["content"]
                break
    elif present != count:
        raise RowProblem("image_count", f"{present} {IMAGE_PLACEHOLDER} placeholder(s) for {count} image(s)")


def convert_mecovqa_g(item: dict, ctx: ConvertContext) -> dict:
    """A MeCoVQA-G item -> one row (masks from the ``<mask>`` paths in the answer)."""
    if "image" not in item:
        raise RowProblem("schema", "MeCoVQA-G items need 'image'")
    messages, masks = _conversations(item, ctx)
    _ensure_image_placeholders(messages, 1)
    seg = sum(m["content"].count(SEG_TOKEN) for m in messages)
    if seg != len(masks):
        raise RowProblem("seg_mask_count", f"{seg} <SEG> answer(s) but {len(masks)} <mask>path</mask> entries")
    row = {"messages": messages, "images": [ctx.image(str(item["image"]))], "task": "segmentation"}
    if masks:
        row["masks"] = [ctx.mask(m) for m in masks]
    row["meta"] = {"id": item.get("id"), "dataset": "MeCoVQA-G", "modality": item.get("modality", "unknown")}
    return row


def convert_medsegbench(item: dict, ctx: ConvertContext) -> dict:
    """A MedSegBench item -> one row (``metadata.dataset``/``region`` kept in ``meta``)."""
    images = item.get("images")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise RowProblem("schema", "MedSegBench items need 'images' (a list of paths)")
    messages, inline_masks = _conversations(item, ctx)
    _ensure_image_placeholders(messages, len(images))
    masks = item.get("masks") or []
    masks = [masks] if isinstance(masks, str) else list(masks)
    masks += inline_masks
    seg = sum(m["content"].count(SEG_TOKEN) for m in messages)
    if seg != len(masks):
        raise RowProblem("seg_mask_count", f"{seg} [SEG]/<SEG> token(s) but {len(masks)} mask(s)")
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    return {
        "messages": messages,
        "images": [ctx.image(str(p)) for p in images],
        "masks": [ctx.mask(str(m)) for m in masks],
        "task": "segmentation",
        "meta": {"id": item.get("id"), "dataset": metadata.get("dataset"), "region": metadata.get("region"),
                 "modality": metadata.get("modality", "unknown")},
    }


def convert_detection(item: dict, ctx: ConvertContext) -> dict:
    """A detection item -> a row asking for the box, with ``objects`` in original pixels."""
    for key in ("image", "sentence", "bbox"):
        if key not in item:
            raise RowProblem("schema", f"detection items need 'image', 'sentence', 'bbox' (missing '{key}')")
    bbox = item["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise RowProblem("schema", "'bbox' must be [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if max(x1, y1, x2, y2) <= 1.0 and "width" in item and "height" in item:
        width, height = float(item["width"]), float(item["height"])
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    sentence = str(item["sentence"]).strip()
    return {
        "messages": [
            {"role": "user", "content": IMAGE_PLACEHOLDER + DETECTION_PROMPT.format(sentence)},
            {"role": "assistant", "content": DETECTION_ANSWER},
        ],
        "images": [ctx.image(str(item["image"]))],
        "objects": {"ref": [sentence], "bbox": [[round(v, 2) for v in (x1, y1, x2, y2)]]},
        "task": "detection",
        "meta": {"id": item.get("id"), "dataset": "detection", "modality": item.get("modality", "unknown")},
    }


def _vqa(item: dict, ctx: ConvertContext, dataset: str, image_keys: tuple[str, ...]) -> dict:
    image = next((item[k] for k in image_keys if item.get(k)), None)
    if image is None or "question" not in item or "answer" not in item:
        raise RowProblem("schema", f"{dataset} items need {' or '.join(image_keys)}, 'question' and 'answer'")
    image = str(image)
    if not Path(image).suffix and ctx.image_suffix:
        image += ctx.image_suffix  # PathVQA names images without their extension
    answer = str(item["answer"]).strip()
    answer_type = str(item.get("answer_type", "")).upper()
    closed = answer_type == "CLOSED" or (not answer_type and answer.lower() in ("yes", "no"))
    meta = {"id": item.get("qid", item.get("id")), "dataset": dataset,
            "modality": item.get("modality", "unknown"), "answer_type": "closed" if closed else "open"}
    organ = item.get("image_organ", item.get("location"))
    if organ:
        meta["organ"] = organ
    return {
        "messages": [
            {"role": "user", "content": IMAGE_PLACEHOLDER + str(item["question"]).strip()},
            {"role": "assistant", "content": answer},
        ],
        "images": [ctx.image(image)],
        "task": "vqa-closed" if closed else "vqa-open",
        "meta": meta,
    }


def convert_vqa_rad(item: dict, ctx: ConvertContext) -> dict:
    """A VQA-RAD item (``image_name``, ``question``, ``answer``, ``answer_type``, ``image_organ``)."""
    return _vqa(item, ctx, "VQA-RAD", ("image_name", "image"))


def convert_slake(item: dict, ctx: ConvertContext) -> dict:
    """A SLAKE item (``img_name``, ``question``, ``answer``, ``q_lang``, ``answer_type``, ``modality``)."""
    if ctx.lang != "all" and str(item.get("q_lang", "en")) != ctx.lang:
        raise RowProblem("language", f"q_lang {item.get('q_lang')!r} is not {ctx.lang!r} (use --lang all to keep)")
    return _vqa(item, ctx, "SLAKE", ("img_name", "image"))


def convert_pathvqa(item: dict, ctx: ConvertContext) -> dict:
    """A PathVQA item (``image`` without extension, ``question``, ``answer``)."""
    return _vqa(item, ctx, "PathVQA", ("image", "img_name", "image_name"))


CONVERTERS: dict[str, Callable[[dict, ConvertContext], dict]] = {
    "mecovqa-g": convert_mecovqa_g,
    "medsegbench": convert_medsegbench,
    "detection": convert_detection,
    "vqa-rad": convert_vqa_rad,
    "slake": convert_slake,
    "pathvqa": convert_pathvqa,
}


def convert_file(
    fmt: str,
    input_file: str | Path,
    out_file: str | Path,
    image_root: str | Path | None = None,
    mask_root: str | Path | None = None,
    strict: bool = False,
    lang: str = "en",
    image_suffix: str = ".jpg",
) -> ConvertReport:
    """Convert ``input_file`` in layout ``fmt`` to a Citrus-V JSONL file; skipped items are counted."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(CONVERTERS)}")
    input_file, out_file = Path(input_file), Path(out_file)
    if not input_file.is_file():
        raise FileNotFoundError(f"input file not found: {input_file}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    ctx = ConvertContext(
        input_file,
        out_file.parent.resolve(),
        Path(image_root).resolve() if image_root else input_file.parent.resolve(),
        Path(mask_root).resolve() if mask_root else (Path(image_root).resolve() if image_root
                                                     else input_file.parent.resolve()),
        lang,
        image_suffix,
    )
    report = ConvertReport(skips=SkipCounter(strict=strict))
    convert = CONVERTERS[fmt]
    with open(out_file, "w", encoding="utf-8") as handle:
        for number, item in read_items(input_file):
            try:
                if isinstance(item, RowProblem):
                    raise item
                if not isinstance(item, dict):
                    raise RowProblem("schema", f"an item must be a JSON object, got {type(item).__name__}")
                row = convert(item, ctx)
            except RowProblem as problem:
                report.skips.record(RowIssue(str(input_file), number, problem.reason, str(problem)))
                continue
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.written += 1
    return report
