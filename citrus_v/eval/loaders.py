"""Benchmark loaders: local copies of the public sets in their published layouts, and Citrus-V rows.

``--data`` takes ``PATH`` or ``NAME=PATH`` (several sets: repeat ``--data`` or separate with commas).
Without a name the layout is recognised from the files (see :data:`LAYOUTS` for what each expects); a set
that is missing or does not have its layout fails with the expected layout in the message. Nothing is
downloaded. Where :mod:`citrus_v.data.converters` already reads a layout (MeCoVQA-G, MedSegBench, the
detection JSONL, VQA-RAD, SLAKE, PathVQA), its converter turns each item into a row first.

Every sample gets an id (the dataset's own when it has one, else ``file:line``); a duplicate id is an
error naming both places. Items a loader leaves out on purpose (SLAKE questions in other languages, report
rows without findings, rows of tasks that are not evaluated) are counted by reason.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.converters import (
    ConvertContext,
    convert_detection,
    convert_mecovqa_g,
    convert_medsegbench,
    convert_pathvqa,
    convert_slake,
    convert_vqa_rad,
    read_items,
    read_pickle_items,
    vqa_rad_split,
)
from ..data.rows import (
    RowIssue,
    RowProblem,
    check_schema,
    count_seg,
    object_boxes,
    read_jsonl,
    render_objects,
    row_modality,
    row_task,
)
from . import prompts
from .answers import answer_span, tagged_answer
from .doc_metrics import json_object
from .samples import ROW_TASKS, EvalDataError, EvalSample, row_eval_task, with_row_fields


@dataclass
class LoadOptions:
    """Where and what to read: the split (rows folders), and the image root for layouts that need one."""

    split: str = "test"
    image_root: Path | None = None


@dataclass
class Loaded:
    """The samples of one set and what was left out, by reason."""

    name: str
    path: Path
    samples: list[EvalSample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Layout:
    """A dataset layout: what a person must have on disk, and the function that reads it."""

    title: str
    expected: str
    load: Callable[[Path, str, LoadOptions], Loaded]


def _fail(name: str, path: Path, problem: str) -> EvalDataError:
    layout = LAYOUTS[name]
    return EvalDataError(f"{name} at {path}: {problem}\nexpected layout ({layout.title}): {layout.expected}")


# --- Citrus-V rows -------------------------------------------------------------------------------------------
def _turns(row: dict[str, Any], messages: list[dict]) -> tuple[str | None, list[dict], str, str]:
    """``(system, history, prompt, reference answer)``: the last user turn and the answer after it."""
    system = row.get("system")
    turns = []
    for message in messages:
        if message["role"] == "system":
            system = message["content"] if system is None else system
        else:
            turns.append({"role": message["role"], "content": message["content"]})
    last = max((k for k, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None or last == 0 or turns[last - 1]["role"] != "user":
        raise RowProblem("schema", "the row needs a user turn followed by the assistant's reference answer")
    return system, turns[: last - 1], turns[last - 1]["content"], turns[last]["content"]


def _spacing(meta: dict) -> tuple[float, float] | None:
    value = meta.get("spacing_mm", meta.get("spacing"))
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return None


def row_to_sample(row: dict[str, Any], sample_id: str, source: str, base_dir: Path, dataset: str) -> EvalSample | str:
    """An :class:`EvalSample` for one Citrus-V row, or the reason the row is not evaluated (a string).

    Raises :class:`RowProblem` for a row whose ground truth is unusable.
    """
    check_schema(row)
    kind = row_task(row)
    task = row_eval_task(row, ROW_TASKS.get(kind))
    if task is None:
        return f"task_{kind}"
    # an absent target asked as a detection question may name it through objects.ref (no boxes)
    messages = render_objects(row, None) if task in ("det", "absent") else row["messages"]
    system, history, prompt, answer = _turns(row, messages)
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    groups = {"dataset": str(meta.get("dataset") or dataset), "modality": row_modality(row)}
    for key in ("region", "organ"):
        if meta.get(key):
            groups[key] = str(meta[key])
    sample = EvalSample(
        id=sample_id, task=task, prompt=prompt, images=list(row.get("images") or []), reference=None,
        source=source, base_dir=base_dir, system=system, history=history, groups=groups, spacing=_spacing(meta),
        template="row",
    )
    if not sample.images and task in ("seg", "det"):
        raise RowProblem("schema", f"a {kind} row needs an image")
    if task == "seg":
        masks = list(row.get("masks") or [])
        if count_seg(row) != len(masks):
            raise RowProblem("seg_mask_count", f"{count_seg(row)} [SEG] token(s) but {len(masks)} mask(s)")
        sample.reference = masks
    elif task == "det":
        boxes = [b.xyxy for b in object_boxes(row)]
        if not boxes:
            raise RowProblem("objects", "a detection row needs its boxes in 'objects': {'ref': [...], 'bbox': [...]}")
        sample.reference = boxes
    elif task == "vqa":
        sample.reference = answer.strip()
        closed = kind.startswith("vqa-closed") or str(meta.get("answer_type", "")).lower() == "closed"
        options = meta.get("options")
        sample.options = {str(k): str(v) for k, v in options.items()} if isinstance(options, dict) else None
        sample.answer_type = "closed" if closed or sample.options else "open"
        groups["answer_type"] = sample.answer_type
    elif task == "doc":
        sample.reference = answer.strip()
        sample.answer_type = "extraction" if json_object(answer) is not None else "qa"
        groups["answer_type"] = sample.answer_type
    elif task == "cot":
        reference = tagged_answer(answer)
        sample.reference = (reference if reference is not None else answer_span(answer)).strip()
        options = meta.get("options")
        sample.options = {str(k): str(v) for k, v in options.items()} if isinstance(options, dict) else None
    else:
        sample.reference = answer.strip()
    return with_row_fields(sample, row)


def _row_id(row: dict[str, Any], fallback: str) -> str:
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    value = row.get("id", meta.get("id"))
    return str(value) if value not in (None, "") else fallback


def _rows_file(path: Path, name: str, dataset: str) -> Loaded:
    loaded = Loaded(name, path)
    for item in read_jsonl(path):
        if isinstance(item, RowIssue):
            raise _fail(name, path, f"{item}")
        try:
            sample = row_to_sample(
                item.row, _row_id(item.row, f"{path.stem}:{item.line}"), item.where, item.base_dir, dataset
            )
        except RowProblem as problem:
            raise _fail(name, path, f"{item.where}: [{problem.reason}] {problem}") from None
        if isinstance(sample, str):
            loaded.skipped[sample] += 1
        else:
            loaded.samples.append(sample)
    return loaded


def load_rows(path: Path, name: str, options: LoadOptions) -> Loaded:
    """Citrus-V JSONL rows: a folder with ``{split}.jsonl`` (the synthetic corpus) or one ``.jsonl`` file."""
    # rows without meta.dataset are named after their folder; the synthetic corpus's folder has images/ and masks/
    if path.is_dir():
        split_file = path / f"{options.split}.jsonl"
        if not split_file.is_file():
            raise _fail(name, path, f"no {split_file.name} in the folder")
        path = split_file
    elif not path.is_file():
        raise _fail(name, path, "no such file or folder")
    synthetic = (path.parent / "images").is_dir() and (path.parent / "masks").is_dir()
    return _rows_file(path, name, "synthetic" if synthetic else path.stem)


# --- layouts read through the data converters ----------------------------------------------------------------
def _converted(
    name: str,
    path: Path,
    file: Path,
    convert: Callable[[dict, ConvertContext], dict],
    image_root: Path,
    dataset: str,
    keep: Callable[[dict], bool] | None = None,
    items: Iterable[tuple[int, Any]] | None = None,
    **context: Any,
) -> Loaded:
    loaded = Loaded(name, path)
    ctx = ConvertContext(file, image_root, image_root, image_root, **context)
    try:
        source_items = list(items if items is not None else read_items(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(name, path, f"{file} is not JSON or JSONL ({err})") from None
    if not source_items:
        raise _fail(name, path, f"{file} holds no items")
    for number, item in source_items:
        where = f"{file}:{number}"
        if isinstance(item, RowProblem):
            raise _fail(name, path, f"{where}: {item}")
        if not isinstance(item, dict):
            raise _fail(name, path, f"{where}: an item must be a JSON object, got {type(item).__name__}")
        if keep is not None and not keep(item):
            loaded.skipped["not_test_split"] += 1
            continue
        try:
            row = convert(item, ctx)
        except RowProblem as problem:
            if problem.reason == "language":
                loaded.skipped["other_language"] += 1
                continue
            raise _fail(name, path, f"{where}: [{problem.reason}] {problem}") from None
        meta = row.setdefault("meta", {})
        meta["dataset"] = meta.get("dataset") or dataset
        try:
            sample = row_to_sample(row, _row_id(row, f"{file.stem}:{number}"), where, image_root, dataset)
        except RowProblem as problem:
            raise _fail(name, path, f"{where}: [{problem.reason}] {problem}") from None
        if isinstance(sample, str):
            loaded.skipped[sample] += 1
            continue
        sample.template = {"det": "det", "seg": "seg", "vqa": "vqa"}.get(sample.task, "row")
        loaded.samples.append(sample)
    return loaded


def _json_file(name: str, path: Path, candidates: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    for candidate in candidates:
        if (path / candidate).is_file():
            return path / candidate
    raise _fail(name, path, f"none of {', '.join(candidates)} found" if path.is_dir() else "no such file or folder")


_SA_MED2D_MODALITY = {
    "ct": "CT", "mr": "MR", "pet": "PET", "x": "X-ray", "xray": "X-ray", "us": "US", "ultrasound": "US",
    "endoscopy": "endoscopy", "fundus": "fundus", "dermoscopy": "DER", "derm": "DER",
}


def modality_from_name(image: str) -> str:
    """A modality from an SA-Med2D style file name (``mr_t1--BraTS--case--x_0075.png`` -> ``MR``), or unknown."""
    head = Path(image).name.split("--")[0].lower()
    word = re.split(r"[_\-\s]", head)[0]
    return _SA_MED2D_MODALITY.get(word, "unknown")


def load_mecovqa_g(path: Path, name: str, options: LoadOptions) -> Loaded:
    """MeCoVQA-G / MeCoVQA-G-Plus: a JSON list of ``{id, image, conversations}`` with ``<SEG><mask>path</mask>``."""
    file = _json_file(name, path, ("test.json", "MeCoVQA_Grounding_test.json", "test.jsonl"))
    root = options.image_root or file.parent
    loaded = _converted(name, path, file, convert_mecovqa_g, root, "MeCoVQA-G")
    for sample in loaded.samples:
        if sample.groups.get("modality", "unknown") == "unknown" and sample.images:
            sample.groups["modality"] = modality_from_name(str(sample.images[0]))
    return loaded


def load_medsegbench(path: Path, name: str, options: LoadOptions) -> Loaded:
    """MedSegBench: ``{id, images, masks, conversations, metadata: {dataset, region}}`` items."""
    file = _json_file(name, path, ("test.json", "test.jsonl", "medsegbench_test.json"))
    loaded = _converted(name, path, file, convert_medsegbench, options.image_root or file.parent, "MedSegBench")
    for sample in loaded.samples:  # MedSegBench is reported by its own datasets
        if sample.groups.get("dataset") in (None, "None", "MedSegBench"):
            sample.groups["dataset"] = "MedSegBench"
    return loaded


def load_detection(path: Path, name: str, options: LoadOptions) -> Loaded:
    """Upstream's detection JSONL: ``{image, sentence, bbox: [x1, y1, x2, y2], width, height}`` per line."""
    file = _json_file(name, path, ("test.jsonl", "detection_test.jsonl", "test.json"))
    return _converted(name, path, file, convert_detection, options.image_root or file.parent, "detection")


def load_vqa_rad(path: Path, name: str, options: LoadOptions) -> Loaded:
    """VQA-RAD: ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``; test = phrase_type test_*."""
    file = _json_file(name, path, ("VQA_RAD Dataset Public.json", "testset.json", "test.json"))
    root = options.image_root or next(
        (p for p in (file.parent / "VQA_RAD Image Folder", file.parent / "images") if p.is_dir()), file.parent
    )
    items = list(read_items(file))
    has_split = any(isinstance(i, dict) and vqa_rad_split(i) for _, i in items)

    def keep(item: dict) -> bool:
        return not has_split or vqa_rad_split(item) == "test"

    return _converted(name, path, file, convert_vqa_rad, root, "VQA-RAD", keep=keep, items=items)


def load_slake(path: Path, name: str, options: LoadOptions) -> Loaded:
    """SLAKE 1.0: ``test.json`` and ``imgs/``; English questions (``q_lang == "en"``)."""
    file = _json_file(name, path, ("test.json",))
    root = options.image_root or (file.parent / "imgs" if (file.parent / "imgs").is_dir() else file.parent)
    return _converted(name, path, file, convert_slake, root, "SLAKE")


def load_pathvqa(path: Path, name: str, options: LoadOptions) -> Loaded:
    """PathVQA: ``qas/test/test_qa.pkl`` (or a JSON/JSONL export) and ``images/test/<image>.jpg``."""
    file = _json_file(name, path, ("qas/test/test_qa.pkl", "qas/test_qa.pkl", "test_qa.pkl", "test.json", "test.jsonl"))
    base = file.parent.parent.parent if file.parent.name == "test" and file.parent.parent.name == "qas" else file.parent
    root = options.image_root or next((p for p in (base / "images" / "test", base / "images") if p.is_dir()), base)
    items = None
    if file.suffix == ".pkl":
        try:
            items = read_pickle_items(file)  # plain data only: a dataset file must not run code
        except ValueError as err:
            raise _fail(name, path, str(err)) from None
    return _converted(name, path, file, convert_pathvqa, root, "PathVQA", items=items)


# --- multiple-choice sets ------------------------------------------------------------------------------------
_CHOICE_PREFIX = re.compile(r"^\s*\(?[A-Za-z]\s*[:.)]\s*")


def load_pmc_vqa(path: Path, name: str, options: LoadOptions) -> Loaded:
    """PMC-VQA: ``test_clean.csv`` (or ``test.csv``) with Figure_path, Question, Choice A-D, Answer_label."""
    file = _json_file(name, path, ("test_clean.csv", "test.csv", "test_2.csv"))
    root = options.image_root or next(
        (p for p in (file.parent / "images", file.parent / "figures") if p.is_dir()), file.parent
    )
    loaded = Loaded(name, path)
    with open(file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"Figure_path", "Question", "Answer_label"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise _fail(name, path, f"{file} lacks the column(s) {sorted(missing)}")
        for line, item in enumerate(reader, start=2):
            choices = {
                column.split()[-1].upper(): _CHOICE_PREFIX.sub("", value or "").strip()
                for column, value in item.items()
                if column and column.startswith("Choice ") and value
            }
            label = str(item.get("Answer_label") or "").strip().upper()
            if label not in choices:
                raise _fail(
                    name, path, f"{file}:{line}: Answer_label {label!r} is not one of the choices {sorted(choices)}"
                )
            question = str(item["Question"]).strip()
            sample = EvalSample(
                id=str(item.get("index") or f"{file.stem}:{line}"), task="vqa",
                prompt="<image>" + prompts.multiple_choice(question, choices), images=[str(root / item["Figure_path"])],
                reference=label, source=f"{file}:{line}", options=choices, answer_type="closed",
                groups={"dataset": "PMC-VQA", "modality": "unknown", "answer_type": "closed"}, template="vqa-mc",
            )
            loaded.samples.append(sample)
    return loaded


def load_medxpertqa(path: Path, name: str, options: LoadOptions) -> Loaded:
    """MedXpertQA-MM: ``MM/test.jsonl`` items ``{id, question, options, label, images}`` and ``images/``."""
    file = _json_file(name, path, ("MM/test.jsonl", "test.jsonl"))
    base = file.parent.parent if file.parent.name == "MM" else file.parent
    root = options.image_root or (base / "images" if (base / "images").is_dir() else base)
    loaded = Loaded(name, path)
    for item in read_jsonl(file):
        if isinstance(item, RowIssue):
            raise _fail(name, path, str(item))
        row = item.row
        choices = row.get("options")
        if not (isinstance(choices, dict) and row.get("question") and row.get("label") and row.get("images")):
            raise _fail(name, path, f"{item.where}: needs 'question', 'options' {{letter: text}}, 'label', 'images'")
        choices = {str(k).upper(): str(v) for k, v in choices.items()}
        inline = "Answer Choices" in str(row["question"])
        images = [str(root / str(image)) for image in row["images"]]
        loaded.samples.append(EvalSample(
            id=str(row.get("id") or f"{file.stem}:{item.line}"), task="vqa",
            prompt="<image>" * len(images) + prompts.multiple_choice(str(row["question"]), choices, inline=inline),
            images=images, reference=str(row["label"]).strip().upper(), source=item.where, options=choices,
            answer_type="closed", template="vqa-mc-inline" if inline else "vqa-mc",
            groups={"dataset": "MedXpertQA-MM", "modality": str(row.get("body_system") or "unknown"),
                    "answer_type": "closed", "question_type": str(row.get("question_type") or "unknown")},
        ))
    return loaded


# --- reports -------------------------------------------------------------------------------------------------
REPORT_IMAGE_KEYS = ("image", "image_path", "path_to_image", "path", "filename")
REPORT_TEXT_KEYS = ("findings", "section_findings", "report", "text")


def _report_items(file: Path) -> Iterator[tuple[int, dict]]:
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as handle:
            for line, item in enumerate(csv.DictReader(handle), start=2):
                yield line, item
        return
    for item in read_jsonl(file):
        if isinstance(item, RowIssue):
            raise EvalDataError(str(item))
        yield item.line, item.row


def load_reports(path: Path, name: str, options: LoadOptions) -> Loaded:
    """Reports: a CSV or JSONL with an image column and a findings column (CheXpert Plus names work too)."""
    file = _json_file(name, path, ("test.csv", "test.jsonl", "reports.csv", "reports.jsonl"))
    root = options.image_root or file.parent
    loaded = Loaded(name, path)
    try:
        items = list(_report_items(file))
    except EvalDataError as err:
        raise _fail(name, path, str(err)) from None
    for line, item in items:
        image_key = next((k for k in REPORT_IMAGE_KEYS if item.get(k)), None)
        text_key = next((k for k in REPORT_TEXT_KEYS if k in item), None)
        if image_key is None or text_key is None:
            raise _fail(name, path, f"{file}:{line}: needs an image column ({'/'.join(REPORT_IMAGE_KEYS)}) and a "
                        f"findings column ({'/'.join(REPORT_TEXT_KEYS)})")
        findings = str(item.get(text_key) or "").strip()
        if not findings:
            loaded.skipped["no_findings"] += 1
            continue
        sample_id = item.get("id") or item.get("study_id") or f"{file.stem}:{line}"
        loaded.samples.append(EvalSample(
            id=str(sample_id), task="report", prompt="<image>" + prompts.REPORT_PROMPT,
            images=[str(root / str(item[image_key]))], reference=findings, source=f"{file}:{line}",
            groups={"dataset": str(item.get("dataset") or file.stem),
                    "modality": str(item.get("modality") or "unknown")},
            template="report",
        ))
    return loaded


LAYOUTS: dict[str, Layout] = {
    "rows": Layout(
        "Citrus-V rows / the synthetic corpus",
        "a folder with test.jsonl (as `citrus-v data synth --out DIR` writes) or a .jsonl file of rows "
        '{"messages": [...], "images": [...], "masks": [...], "objects": {...}, "task": ..., "meta": {...}}',
        load_rows,
    ),
    "mecovqa-g": Layout(
        "MeCoVQA-G / MeCoVQA-G-Plus",
        'a JSON list (test.json) of {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, '
        '{"from": "gpt", "value": "<SEG><mask>masks/x.png</mask>"}], "modality"}, image and mask paths relative to '
        "the file's folder (or --image_root)",
        load_mecovqa_g,
    ),
    "medsegbench": Layout(
        "MedSegBench",
        'a JSON list (test.json) of {"id", "images": [...], "masks": [...], "conversations": [...], '
        '"metadata": {"dataset", "region", "modality"}}',
        load_medsegbench,
    ),
    "detection": Layout(
        "upstream detection JSONL",
        'test.jsonl, one {"image", "sentence", "bbox": [x1, y1, x2, y2], "width", "height"} per line (pixels, or '
        "0-1 fractions of width/height)",
        load_detection,
    ),
    "vqa-rad": Layout(
        "VQA-RAD",
        'a folder with "VQA_RAD Dataset Public.json" (items {qid, image_name, question, answer, answer_type, '
        'phrase_type}) and "VQA_RAD Image Folder/"; the test questions are those with phrase_type test_*',
        load_vqa_rad,
    ),
    "slake": Layout(
        "SLAKE 1.0",
        "a folder (Slake1.0) with test.json (items {img_name, question, answer, q_lang, answer_type, modality}) "
        "and imgs/",
        load_slake,
    ),
    "pathvqa": Layout(
        "PathVQA",
        "a folder with qas/test/test_qa.pkl (a list of {image, question, answer}) or test.json, and "
        "images/test/<image>.jpg",
        load_pathvqa,
    ),
    "pmc-vqa": Layout(
        "PMC-VQA",
        "a folder with test_clean.csv (columns Figure_path, Question, Answer, Choice A..D, Answer_label) and "
        "images/ (or figures/)",
        load_pmc_vqa,
    ),
    "medxpertqa-mm": Layout(
        "MedXpertQA-MM",
        'a folder with MM/test.jsonl (items {"id", "question", "options": {"A": ...}, "label", "images": [...]}) '
        "and images/",
        load_medxpertqa,
    ),
    "report": Layout(
        "radiology reports",
        "a CSV or JSONL (test.csv / test.jsonl) with an image column (image, image_path, path_to_image) and a "
        "findings column (findings, section_findings, report); image paths relative to the file's folder",
        load_reports,
    ),
}
ALIASES = {"mecovqa-g-plus": "mecovqa-g", "synthetic": "rows", "chexpert-plus": "report", "reports": "report",
           "medxpertqa": "medxpertqa-mm", "pmcvqa": "pmc-vqa", "vqarad": "vqa-rad"}


def detect_layout(path: Path) -> str:
    """The layout name of an unnamed ``--data PATH``, recognised from its files."""
    if path.is_file():
        if path.suffix == ".jsonl":
            first = next((i for i in read_jsonl(path) if not isinstance(i, RowIssue)), None)
            if first is not None and "messages" in first.row:
                return "rows"
            if first is not None and {"image", "sentence", "bbox"} <= set(first.row):
                return "detection"
            if first is not None and {"options", "label", "images"} <= set(first.row):
                return "medxpertqa-mm"
        if path.name == "VQA_RAD Dataset Public.json":
            return "vqa-rad"
        if path.suffix == ".csv":
            header = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
            return "pmc-vqa" if "Figure_path" in header else "report"
    elif path.is_dir():
        checks = [
            ("rows", ("test.jsonl", "train.jsonl", "val.jsonl")),
            ("vqa-rad", ("VQA_RAD Dataset Public.json",)),
            ("pathvqa", ("qas",)),
            ("medxpertqa-mm", ("MM/test.jsonl",)),
            ("pmc-vqa", ("test_clean.csv",)),
        ]
        for name, files in checks:
            if any((path / f).exists() for f in files):
                return name
        if (path / "test.json").is_file() and (path / "imgs").is_dir():
            return "slake"
    else:
        raise EvalDataError(f"--data {path}: no such file or folder")
    known = "\n".join(f"  {name}: {layout.expected}" for name, layout in LAYOUTS.items())
    raise EvalDataError(
        f"--data {path}: the layout was not recognised; name it as NAME=PATH with one of these layouts:\n{known}"
    )


def parse_data_specs(values: Iterable[str]) -> list[tuple[str, Path]]:
    """``["NAME=PATH", "PATH,NAME=PATH", ...]`` -> ``[(layout name, path)]`` (names resolved or detected)."""
    specs = []
    for value in values:
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, rest = part.partition("=")
            if sep and (name.lower() in LAYOUTS or name.lower() in ALIASES):
                key = ALIASES.get(name.lower(), name.lower())
                specs.append((key, Path(rest).expanduser()))
            elif sep and not Path(part).exists():
                raise EvalDataError(f"--data {part}: unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
            else:
                path = Path(part).expanduser()
                specs.append((detect_layout(path), path))
    if not specs:
        raise EvalDataError("--data: give at least one PATH or NAME=PATH")
    return specs


def load_data(values: Iterable[str], options: LoadOptions | None = None) -> list[Loaded]:
    """Read every ``--data`` set; duplicate sample ids (within or across sets) are an error."""
    options = options or LoadOptions()
    loaded = []
    seen: dict[str, str] = {}
    for name, path in parse_data_specs(values):
        if not path.exists():
            raise _fail(name, path, "no such file or folder")
        result = LAYOUTS[name].load(path, name, options)
        for sample in result.samples:
            if sample.id in seen:
                raise EvalDataError(
                    f"duplicate sample id {sample.id!r}: {sample.source} and {seen[sample.id]}; ids must be unique "
                    "(give each row its own 'id')"
                )
            seen[sample.id] = sample.source
        loaded.append(result)
    return loaded
