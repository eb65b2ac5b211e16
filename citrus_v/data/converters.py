"""Converters from public dataset layouts to Citrus-V rows (``citrus-v data convert --from FORMAT``).

Formats (what one item looks like):
- ``mecovqa-g``: ``{id, image, conversations: [{from, value: "<image>\\n..."},
  {from, value: "<SEG><mask>path</mask>"}]}``
- ``medsegbench``: ``{id, images, masks, conversations, metadata: {dataset, region}}``
- ``detection``: JSONL ``{image, sentence, bbox: [x1, y1, x2, y2], width, height}`` (original pixels, or 0-1
  fractions of ``width``/``height``)
- ``vqa-rad``, ``slake``, ``pathvqa``: question/answer JSON (``image_name`` / ``img_name`` / ``image``;
  SLAKE keeps ``q_lang == "en"`` unless ``--lang all``); PathVQA's pickles are read as plain data only

The input is a file (a JSON array, an object holding one such as ``{"data": [...]}``, JSONL, or PathVQA's
pickle) or the release's folder as published (:data:`RELEASES` says what each holds). The images are looked
for under the release's own folder names (VQA-RAD: ``VQA_RAD Image Folder/``; SLAKE: ``imgs/``; PathVQA:
``images/<split>/``; MeCoVQA-G: the SA-Med2D folder ``SAMed2Dv1/`` when it lies beside the file) unless
``--image_root`` names the folder; masks under ``--mask_root`` (default: where the images are). Paths are
written relative to the output file's folder.

Splits are kept as the release gives them: VQA-RAD's ``phrase_type`` (``test_freeform``/``test_para`` ->
test, ``freeform``/``para`` -> train), SLAKE's and PathVQA's files (``validate`` -> val), or a split word in
the file's name. Each row carries ``meta.split`` and every split gets its own file, so test questions cannot
enter training by accident: ``--out DIR`` writes ``DIR/<split>.jsonl``; ``--out FILE.jsonl`` writes that file
when there is one split and ``FILE_<split>.jsonl`` when there are several. Rows of a source that names no split
go to ``unsplit``.

Items that cannot be converted, or whose image or mask file does not exist, are skipped and counted with
``file:item``; what was written is then checked by :func:`citrus_v.data.validate.validate_files`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..processing.boxes import DETECTION_PROMPT
from ..tokens import IMAGE_PLACEHOLDER, SEG_TOKEN
from .rows import RowIssue, RowProblem, SkipCounter
from .validate import ValidationOptions, ValidationReport, validate_files

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
    """A VQA-RAD item (``image_name``, ``question``, ``answer``, ``answer_type``, ``image_organ``, ``phrase_type``)."""
    row = _vqa(item, ctx, "VQA-RAD", ("image_name", "image"))
    if item.get("phrase_type"):
        row["meta"]["phrase_type"] = str(item["phrase_type"])
    return row


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


# --- reading a source file -----------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain lists, dicts, strings and numbers only: a dataset file must not run code."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset pickle")


def read_pickle_items(path: Path) -> list[tuple[int, Any]]:
    """``(item number, item)`` of a pickled list of dicts (PathVQA's ``qas/<split>/<split>_qa.pkl``)."""
    try:
        with open(path, "rb") as handle:
            data = _PlainUnpickler(io.BufferedReader(handle)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a plain pickle of question dicts ({err})") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    return list(enumerate(data, start=1))


def read_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line or item number, item)`` from a JSON array, ``{"data": [...]}``-style object, JSONL or pickle file.

    Lines that are not JSON come back as ``(number, RowProblem)``.
    """
    if path.suffix == ".pkl":
        yield from read_pickle_items(path)
        return
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


# --- the public releases: their files, splits and image folders ----------------------------------------------
SPLITS = ("train", "val", "test")
UNSPLIT = "unsplit"  # rows of a source that names no split
_SPLIT_WORD = re.compile(r"(?<![a-z])(train|val|test)")


def split_from_name(name: str) -> str | None:
    """The split a file name says (``test.json``, ``validate.json`` -> val, ``train_qa.pkl``), or None."""
    found = _SPLIT_WORD.search(Path(name).name.lower())
    return found.group(1) if found else None


def vqa_rad_split(item: dict) -> str | None:
    """VQA-RAD's own split of a question: ``test_freeform``/``test_para`` -> test, ``freeform``/``para`` -> train."""
    phrase = str(item.get("phrase_type") or "").strip().lower()
    if not phrase:
        return None
    return "test" if phrase.startswith("test") else "train"


@dataclass(frozen=True)
class SourceFile:
    """One file of a release: its split (None: per item, or not given) and where its images may be, in order."""

    path: Path
    split: str | None
    image_roots: tuple[Path, ...]


@dataclass(frozen=True)
class Release:
    """A public release's layout: what it holds (for messages) and how its files and splits are found."""

    expected: str
    sources: Callable[[Path], list[SourceFile]]
    item_split: Callable[[dict], str | None] | None = None


def _present(folder: Path, names: tuple[str, ...]) -> list[Path]:
    return [folder / name for name in names if (folder / name).is_file()]


def _vqa_rad_sources(path: Path) -> list[SourceFile]:
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else (
        _present(folder, ("VQA_RAD Dataset Public.json",)) or _present(folder, ("trainset.json", "testset.json"))
    )
    roots = (folder / "VQA_RAD Image Folder", folder / "images", folder)
    return [SourceFile(f, split_from_name(f.name), roots) for f in files]


def _slake_sources(path: Path) -> list[SourceFile]:
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else _present(folder, ("train.json", "validate.json", "validation.json",
                                                           "test.json"))
    return [SourceFile(f, split_from_name(f.name), (folder / "imgs", folder)) for f in files]


def _pathvqa_sources(path: Path) -> list[SourceFile]:
    if path.is_dir():
        base, files = path, []
        for split in SPLITS:
            files += _present(path, (f"qas/{split}/{split}_qa.pkl", f"qas/{split}_qa.pkl", f"{split}.json",
                                     f"{split}.jsonl"))[:1]
    else:
        parents = [p.name for p in path.parents][:2]
        base = path.parents[parents.index("qas") + 1] if "qas" in parents else path.parent
        files = [path]
    sources = []
    for file in files:
        split = split_from_name(file.name)
        roots = ((base / "images" / split,) if split else ()) + (base / "images", base, file.parent)
        sources.append(SourceFile(file, split, roots))
    return sources


def _single_file_sources(beside: tuple[str, ...] = ()) -> Callable[[Path], list[SourceFile]]:
    """A format published as one JSON file per split: the file given, or a folder's files named for a split."""

    def sources(path: Path) -> list[SourceFile]:
        folder = path if path.is_dir() else path.parent
        if path.is_file():
            files = [path]
        else:
            files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and split_from_name(p.name))
        roots = (folder,) + tuple(folder / name for name in beside) + tuple(folder.parent / name for name in beside)
        return [SourceFile(f, split_from_name(f.name), roots) for f in files]

    return sources


RELEASES: dict[str, Release] = {
    "mecovqa-g": Release(
        "a JSON file of items (or a folder of them named for their split, e.g. MeCoVQA_Grounding_test.json); "
        "images and masks under the SA-Med2D folder (SAMed2Dv1/, found beside the file or its folder, else "
        "--image_root)",
        _single_file_sources(("SAMed2Dv1",)),
    ),
    "medsegbench": Release("a JSON/JSONL file of items (or a folder of them named for their split)",
                           _single_file_sources()),
    "detection": Release("a JSONL file (or a folder of them named for their split)", _single_file_sources()),
    "vqa-rad": Release(
        'the folder with "VQA_RAD Dataset Public.json" and "VQA_RAD Image Folder/" (or that JSON file); the '
        "split is each question's phrase_type",
        _vqa_rad_sources,
        vqa_rad_split,
    ),
    "slake": Release("the Slake1.0 folder with train.json, validate.json, test.json and imgs/<xmlab…>/source.jpg "
                     "(or one of those files)", _slake_sources),
    "pathvqa": Release("the folder with qas/<split>/<split>_qa.pkl and images/<split>/ (or one of those files)",
                       _pathvqa_sources),
}


PROBE_ITEMS = 50  # items converted to find the image folder (SLAKE interleaves languages)


def _file_of(ref: str, out_dir: Path) -> Path:
    """The file a written reference names (relative to the output folder; a ``#slice=…`` fragment dropped)."""
    path = Path(ref.split("#", 1)[0])
    return path if path.is_absolute() else Path(os.path.normpath(out_dir / path))


def _image_exists(ref: Any, out_dir: Path) -> bool:
    return not isinstance(ref, str) or _file_of(ref, out_dir).is_file()  # a dict is an inline mask (RLE, polygons)


def _choose_root(source: SourceFile, items: list[tuple[int, Any]], make_ctx: Callable[[Path], ConvertContext],
                 convert: Callable[[dict, ConvertContext], dict]) -> Path:
    """The first of the source's image folders that holds the most of its first items' images."""
    candidates = [root for root in source.image_roots if root.is_dir()] or [source.image_roots[0]]
    best, best_hits = candidates[0], 0
    for root in candidates:
        ctx, hits = make_ctx(root), 0
        for _, item in items[:PROBE_ITEMS]:
            try:
                row = convert(item, ctx) if isinstance(item, dict) else {}
            except RowProblem:
                continue
            hits += sum(_image_exists(ref, ctx.out_dir) for ref in row.get("images") or [])
        if hits > best_hits:
            best, best_hits = root, hits
    return best


def _check_files(row: dict, ctx: ConvertContext) -> None:
    """Every image and mask file of a converted row exists (else the fix names the root flag)."""
    for key, flag, root in (("images", "--image_root", ctx.image_root), ("masks", "--mask_root", ctx.mask_root)):
        for k, ref in enumerate(row.get(key) or []):
            if not _image_exists(ref, ctx.out_dir):
                raise RowProblem(
                    f"missing_{key[:-1]}",
                    f"{key}[{k}] {_file_of(ref, ctx.out_dir)} not found (looked under {root}): give {flag} the "
                    f"folder that holds the {key}",
                )


# --- converting ----------------------------------------------------------------------------------------------
@dataclass
class ConvertReport:
    """What a conversion wrote (rows per split and file), skipped (by reason) and what validation found."""

    written: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    outputs: dict[str, tuple[Path, int]] = field(default_factory=dict)  # split -> (file, rows)
    sources: list[str] = field(default_factory=list)
    validation: ValidationReport | None = None  # of the written files

    @property
    def ok(self) -> bool:
        """Something was written and every written row validates."""
        return self.written > 0 and (self.validation is None or self.validation.rejected == 0)

    def format(self) -> str:
        lines = list(self.sources)
        lines.append(f"wrote {self.written} row(s); {self.skips.summary()}")
        for split, (path, count) in self.outputs.items():
            what = "the source names no split" if split == UNSPLIT else f"split {split}"
            lines.append(f"  {path}: {count} row(s), {what}")
        if len([s for s in self.outputs if s != UNSPLIT]) > 1:
            lines.append("  one file per split, so test questions never enter training by accident")
        lines += [f"  {issue}" for issue in self.skips.issues[:50]]
        if self.validation is not None:
            lines.append("validation of the written rows: " + self.validation.format(limit=20))
        if self.written == 0:
            lines.append("nothing was written: check the input and the image folder (--image_root)")
        return "\n".join(lines)


def _output_paths(out: Path, splits: list[str]) -> dict[str, Path]:
    """Where each split's rows go: ``DIR/<split>.jsonl``, or ``FILE.jsonl`` / ``FILE_<split>.jsonl``."""
    if out.is_dir() or not out.suffix:
        return {split: out / f"{split}.jsonl" for split in splits}
    if len(splits) == 1:
        return {splits[0]: out}
    return {split: out.with_name(f"{out.stem}_{split}{out.suffix}") for split in splits}


def _convert_source(source: SourceFile, fmt: str, base: ConvertContext, mask_root: Path | None,
                    report: ConvertReport, rows: dict[str, list[str]]) -> None:
    """Convert one source file's items into ``rows`` (JSON lines per split); skips go to ``report``.

    ``base`` carries the output folder and options; masks are under ``mask_root``, else where the images are.
    """
    convert, release = CONVERTERS[fmt], RELEASES[fmt]
    try:
        items = list(read_items(source.path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source.path}: not a JSON, JSONL or pickle file of items ({err})") from None

    def make_ctx(root: Path) -> ConvertContext:
        return replace(base, input_file=source.path, image_root=root, mask_root=mask_root or root)

    ctx = make_ctx(_choose_root(source, items, make_ctx, convert))
    split_note = "from each item's phrase_type" if release.item_split else (source.split or f"not given ({UNSPLIT})")
    report.sources.append(f"{source.path}: split {split_note}; images under {ctx.image_root}")
    for number, item in items:
        try:
            if isinstance(item, RowProblem):
                raise item
            if not isinstance(item, dict):
                raise RowProblem("schema", f"an item must be a JSON object, got {type(item).__name__}")
            row = convert(item, ctx)
            _check_files(row, ctx)
        except RowProblem as problem:
            report.skips.record(RowIssue(str(source.path), number, problem.reason, str(problem)))
            continue
        split = (release.item_split(item) if release.item_split else None) or source.split
        if split:
            row.setdefault("meta", {})["split"] = split
        rows.setdefault(split or UNSPLIT, []).append(json.dumps(row, ensure_ascii=False))
        report.written += 1


def convert_file(
    fmt: str,
    input_file: str | Path,
    out_file: str | Path,
    image_root: str | Path | None = None,
    mask_root: str | Path | None = None,
    strict: bool = False,
    lang: str = "en",
    image_suffix: str = ".jpg",
    validate: bool = True,
) -> ConvertReport:
    """Convert a release (a file, or its folder) in layout ``fmt`` to Citrus-V JSONL, one file per split.

    Skipped items are counted by reason; with ``validate`` the written files are checked (headers only).
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(CONVERTERS)}")
    source_path, out = Path(input_file), Path(out_file)
    if not source_path.exists():
        raise FileNotFoundError(f"input not found: {source_path}")
    sources = RELEASES[fmt].sources(source_path)
    if not sources:
        raise FileNotFoundError(f"{source_path}: no {fmt} source files found; expected {RELEASES[fmt].expected}")
    out_dir = (out if out.is_dir() or not out.suffix else out.parent).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConvertReport(skips=SkipCounter(strict=strict))
    rows: dict[str, list[str]] = {}
    base = ConvertContext(source_path, out_dir, out_dir, out_dir, lang, image_suffix)
    masks = Path(mask_root).resolve() if mask_root else None
    for source in sources:
        roots = source.image_roots
        if image_root:  # the folder given, or its sub-folder named for the split (PathVQA's images/<split>/)
            root = Path(image_root)
            roots = ((root / source.split,) if source.split else ()) + (root,)
        source = SourceFile(source.path.resolve(), source.split, tuple(r.resolve() for r in roots))
        _convert_source(source, fmt, base, masks, report, rows)
    ordered = sorted(rows, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS))
    for split, path in _output_paths(out, ordered).items():
        path.write_text("".join(line + "\n" for line in rows[split]), encoding="utf-8")
        report.outputs[split] = (path, len(rows[split]))
    if validate and report.outputs:
        report.validation = validate_files([p for p, _ in report.outputs.values()], ValidationOptions(decode=False))
    return report
