"""The synthetic medical corpus: ``citrus-v data synth --out DIR --n N --seed S``.

Writes ``DIR/{train,val,test}.jsonl`` and the files they name: N source images (phantom scans and
rendered lab reports) split 80/10/10 by image, so no image is shared between splits (``--test_images M``
adds M more images to the test split alone, leaving the N and their splits as they were). Scans are CT
(abdomen, chest), MR (abdomen) and X-ray (chest) phantoms with 0-3 lesions, stored as 8-bit PNG, as real
DICOM (with Rescale and Window tags; some radiographs MONOCHROME1) or as NIfTI volumes (several slices of
one volume are used, with a NIfTI label volume for the masks). Masks are PNG files, inline COCO RLE, or
NIfTI labels. Rows cover segmentation (one ``[SEG]`` per mask, several lesions in one answer, prompts
naming different targets in the same image), detection (``objects`` + ``<bbox>`` placeholders rendered
in the model's coordinates), closed VQA (presence, side, count), open VQA (organ, modality, region),
reports with measurements, chain-of-thought answers and lab-report extraction.

"Every lesion" means every lesion: such an answer gives one ``[SEG]`` (one mask) or one box per lesion, in a
fixed order: left to right by the lesion's centre column in the image as shown (patient's right first), ties
top to bottom. The answer says so ("There are 2 lesions, from left to right: lesion 1 [SEG], lesion 2 [SEG].").
A scan with several lesions is always asked for "every lesion"; one with a single lesion or none is asked that
way half the time too (else "the lesion"), so that the words do not tell how many there are: "There is 1 lesion:
lesion 1 [SEG]." and "There is no lesion in this image." answer it as well.

Absent-target rows (:mod:`~citrus_v.data.absent_rows`): asked for a lesion the scan does not have, an organ
outside its field of view or a finding its modality cannot show, the answer says so in words, with no
``[SEG]`` and no box, and the row carries ``meta.absent: true``; ``absent_share`` of the segmentation and
detection rows are such rows. Volumes and clips (``volumes``, ``clips``; :mod:`~citrus_v.data.volume_rows`)
add CT/MR volumes and ultrasound cine loops asked about through ``"videos"`` with 3-D masks.
The same seed always gives byte-identical files.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..media import WINDOW_PRESETS, Window, apply_window, mask_to_rle
from ..processing.boxes import DETECTION_PROMPT
from .absent_rows import AbsentBalance, AbsentQuestion, AbsentScene, absent_meta, absent_rows
from .documents import make_lab_report
from .phantoms import KINDS, ORGANS, Anatomy, Slice, make_anatomy
from .synthetic_dicom import synthetic_dataset
from .volume_rows import (
    ABSENT_STREAM,
    CLIP_STREAM,
    PHRASING_STREAM,
    VOLUME_STREAM,
    asks_every_lesion,
    clip_case,
    every_lesion_answer,
    volume_case,
    write_volume,
)

__all__ = ["CorpusOptions", "CorpusSummary", "split_of", "write_corpus", "write_dicom", "write_volume"]

SPLITS = ("train", "val", "test")
PNG_WINDOWS = {
    ("CT", "abdomen"): Window(*WINDOW_PRESETS["ct-abdomen"]),
    ("CT", "chest"): Window(*WINDOW_PRESETS["ct-lung"]),
    ("MR", "abdomen"): Window(420.0, 900.0),
    ("X-ray", "chest"): Window(2000.0, 4000.0),
}
NIFTI_WINDOWS = {("CT", "abdomen"): "ct-abdomen", ("CT", "chest"): "ct-lung"}
MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "X-ray": "X-ray"}
DETECTION_ANSWER_ITEM = '{"bbox_2d": <bbox>,"label": "<ref-object>"}'
UID_ROOT = "citrus-v-synth"


@dataclass
class CorpusOptions:
    """What :func:`write_corpus` generates.

    Args:
        n: number of source images (scans and documents; a NIfTI volume counts once).
        seed: everything is derived from it.
        size: image side in pixels (224 suits the tiny preset: 64 image tokens).
        formats: probabilities of PNG / DICOM / NIfTI for scans.
        documents: fraction of the images that are lab reports.
        volume_depth: slices per NIfTI volume; slices_per_volume: how many of them get rows.
        rle_fraction: fraction of image-file masks written inline as COCO RLE instead of PNG files.
        test_images: extra images, all in the test split, after the ``n``: a larger held-out set without
            changing which images train (the ``n`` images, their content and their splits stay the same).
        train_documents: extra lab reports, all in the train split, after the ``test_images``: more reports
            to learn reading from, so that a short run does not learn a few by heart, with every held-out image
            as it was.
        document_cell: pixels per printed character of a lab report (see
            :func:`~citrus_v.data.documents.make_lab_report`): 28, one merged image token of Qwen2.5-VL, gives
            an 896 x 224 slip (256 image tokens).
        absent_share: the share of absent-target rows among the segmentation and detection rows, in each split,
            2-D and 3-D apart (lesion-free scans asked for "the lesion" count towards it; 0 adds none).
        volume_absent_share: the same share for the volumes' and clips' rows; None: ``absent_share``.
        absent_detection: also ask detection questions about absent targets (answers without a box); off until
            every consumer of detection rows takes a row without ``objects``.
        volumes: CT/MR volume cases (NIfTI with a NIfTI label volume), split 80/10/10 by volume;
            test_volumes: more volumes, all in the test split.
        volume_slices, volume_size: the range of slices per volume and of pixels per slice side.
        clips: ultrasound cine cases (multi-frame DICOM with a NIfTI label stack), split 80/10/10 by clip;
            clip_frames: the range of frames per clip; clip_size: pixels per frame side.
    """

    n: int = 200
    seed: int = 0
    size: int = 224
    formats: tuple[float, float, float] = (0.5, 0.3, 0.2)
    documents: float = 0.1
    volume_depth: int = 8
    slices_per_volume: int = 3
    rle_fraction: float = 0.25
    document_cell: int = 28
    test_images: int = 0
    train_documents: int = 0
    absent_share: float = 0.15
    volume_absent_share: float | None = None
    absent_detection: bool = False
    volumes: int = 0
    test_volumes: int = 0
    volume_slices: tuple[int, int] = (24, 48)
    volume_size: tuple[int, int] = (128, 224)
    clips: int = 0
    clip_frames: tuple[int, int] = (16, 32)
    clip_size: int = 160


@dataclass
class CorpusSummary:
    out: Path
    rows: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    tasks: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)

    def format(self) -> str:
        lines = [f"wrote the synthetic corpus to {self.out}"]
        for split in SPLITS:
            lines.append(f"  {split}: {self.rows.get(split, 0)} rows, {self.images.get(split, 0)} source images")
        lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(self.tasks.items())))
        lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        return "\n".join(lines)


def split_of(n: int, seed: int, stream: int = 7919) -> list[str]:
    """The split of each of ``n`` images: a seeded shuffle, then 80/10/10 (each split non-empty when n >= 3).
    ``stream`` keeps the shuffles of different kinds of case (images, volumes, clips) apart."""
    n_val = n_test = max(1, round(0.1 * n)) if n >= 3 else 0
    order = np.random.default_rng([seed, stream]).permutation(n)
    labels = ["train"] * n
    for rank, index in enumerate(order):
        if rank < n_val:
            labels[index] = "val"
        elif rank < n_val + n_test:
            labels[index] = "test"
    return labels


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": "<image>" + text}


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _diameter_mm(mask: np.ndarray, spacing: float) -> int:
    return max(1, round(2.0 * np.sqrt(mask.sum() / np.pi) * spacing))


def _side(organ: str) -> str | None:
    return "left" if organ.startswith("left") else "right" if organ.startswith("right") else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _lesion_word(modality: str, contrast: float, region: str) -> str:
    if region == "chest":
        return "nodule"
    if modality == "CT":
        return "hypodense lesion" if contrast < 0 else "hyperdense lesion"
    return "T2-hyperintense lesion" if contrast > 0 else "T2-hypointense lesion"


class _CaseWriter:
    """Writes one case's files and rows (kept apart so every case draws from its own random stream)."""

    def __init__(
        self,
        out: Path,
        split: str,
        case: str,
        options: CorpusOptions,
        rng: np.random.Generator,
        phrasing_rng: np.random.Generator,
        balance: AbsentBalance | None = None,
        absent_rng: np.random.Generator | None = None,
    ) -> None:
        self.out, self.split, self.case, self.options, self.rng = out, split, case, options, rng
        # absent-target rows draw from their own stream, so the other rows are the same at any share
        self.balance, self.absent_rng = balance, absent_rng
        # so does the choice of words for a scan's lesion question
        self.phrasing_rng = phrasing_rng
        self.image_dir = out / "images" / split
        self.mask_dir = out / "masks" / split
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.mask_dir.mkdir(parents=True, exist_ok=True)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    # --- files -------------------------------------------------------------------------------------------
    def png_mask(self, name: str, mask: np.ndarray) -> str | dict:
        if self.rng.uniform() < self.options.rle_fraction:
            return mask_to_rle(mask)
        path = self.mask_dir / f"{self.case}_{name.replace(' ', '_')}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        return self.rel(path)

    def png_image(self, values: np.ndarray, kind: tuple[str, str]) -> str:
        path = self.image_dir / f"{self.case}.png"
        Image.fromarray(apply_window(values, PNG_WINDOWS[kind])).save(path)
        return self.rel(path)

    def dicom_image(self, values: np.ndarray, anatomy: Anatomy) -> str:
        path = self.image_dir / f"{self.case}.dcm"
        write_dicom(path, values, anatomy, f"{UID_ROOT}-{self.options.seed}-{self.case}", self.rng)
        return self.rel(path)


def write_dicom(path: Path, values: np.ndarray, anatomy: Anatomy, uid_seed: str, rng: np.random.Generator) -> None:
    """A single-frame DICOM image with rescale and window tags (CT, MR, or DX possibly MONOCHROME1)."""
    sop_class = {
        "CT": "1.2.840.10008.5.1.4.1.1.2",
        "MR": "1.2.840.10008.5.1.4.1.1.4",
        "X-ray": "1.2.840.10008.5.1.4.1.1.1.1",
    }[anatomy.modality]
    modality = {"CT": "CT", "MR": "MR", "X-ray": "DX"}[anatomy.modality]
    ds = synthetic_dataset(sop_class, uid_seed, modality, anatomy.region.upper())
    ds.Rows, ds.Columns = values.shape
    ds.PixelSpacing = [round(anatomy.spacing_mm, 4), round(anatomy.spacing_mm, 4)]
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    window = PNG_WINDOWS[(anatomy.modality, anatomy.region)]
    ds.PhotometricInterpretation = "MONOCHROME2"
    if anatomy.modality == "CT":
        stored = np.clip(np.rint(values + 1024.0), 0, 4095)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    elif anatomy.modality == "X-ray" and rng.uniform() < 0.5:
        # MONOCHROME1: high stored values display dark; the window is mirrored to show the same picture
        stored = np.clip(np.rint(4095.0 - values), 0, 4095)
        ds.PhotometricInterpretation = "MONOCHROME1"
        window = Window(4095.0 - window.center + 1.0, window.width)
    else:
        stored = np.clip(np.rint(values), 0, 4095)
    ds.WindowCenter, ds.WindowWidth = round(window.center, 1), round(window.width, 1)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


# --- rows ----------------------------------------------------------------------------------------------------
def _task_row(
    task: str, meta: dict, image: str, question: str, answer: str, meta_update: dict | None = None, **extra
) -> dict:
    row = {"task": task, "messages": [_user(question), _answer(answer)], "images": [image]}
    row.update({k: v for k, v in extra.items() if v is not None})
    row["meta"] = dict(meta, **meta_update) if meta_update else meta
    return row


def scan_rows(
    writer: _CaseWriter, view: Slice, image: str, meta: dict, mask_ref, tasks: tuple[str, ...]
) -> list[dict]:
    """Rows for one scan image: ``mask_ref(name, mask)`` returns the reference written for a mask."""
    rng = writer.rng
    anatomy = view.anatomy
    organs = {name: mask for name, mask in view.organs.items() if mask.sum() >= 60}
    # numbered from left to right (by centre column, ties top to bottom), so "lesion 2" names one lesion, as the
    # answers say; detection boxes follow the same order
    lesions = sorted(view.visible_lesions(), key=_reading_order)
    # every lesion pixel of the image: an annotation for training-only objectives
    lesion_mask = mask_to_rle(np.any(np.stack(view.lesions), axis=0)) if view.lesions else mask_to_rle(
        np.zeros(view.values.shape, dtype=bool)
    )

    # the centre of every lesion the answers count: an annotation for training-only objectives
    lesion_points = [[round(float(xs.mean()), 1), round(float(ys.mean()), 1)] for ys, xs in
                     (np.nonzero(mask) for _, mask in lesions)]

    def _row(task: str, question: str, answer: str, **extra) -> dict:
        return _task_row(
            task, meta, image, question, answer, lesion_mask=lesion_mask, lesion_points=lesion_points, **extra
        )

    # one task after the other, in this order: each draws from ``rng``, so the order decides the corpus
    rows: list[dict] = []
    if "segmentation" in tasks and organs:
        rows += _segmentation_rows(_row, rng, organs, lesions, mask_ref, writer.phrasing_rng)
    if "detection" in tasks:
        rows += _detection_rows(_row, rng, organs, lesions)
    if "vqa-closed" in tasks:
        rows.append(_closed_question(_row, rng, lesions))
    if "vqa-open" in tasks:
        rows.append(_open_question(_row, rng, lesions, anatomy))
    if "report" in tasks:
        rows.append(_report_row(_row, organs, lesions, anatomy))
    if "cot" in tasks and organs:
        rows.append(_cot_row(_row, rng, organs, lesions, anatomy))
    return rows + _absent_top_up(writer, anatomy, bool(lesions), rows, _row)


def _reading_order(item: tuple) -> tuple[float, float]:
    """A lesion's place in "every lesion" answers: its mask's centre column, then centre row."""
    ys, xs = np.nonzero(item[1])
    return float(xs.mean()), float(ys.mean())


def _absent_top_up(
    writer: _CaseWriter, anatomy: Anatomy, has_lesion: bool, rows: list[dict], row: Callable[..., dict]
) -> list[dict]:
    """The extra absent-target rows this image gets (:class:`~citrus_v.data.absent_rows.AbsentBalance`)."""
    if writer.balance is None or writer.absent_rng is None:
        return []
    count = writer.balance.extra((writer.split, "image"), rows)
    scene = AbsentScene(anatomy.modality, anatomy.region, "image", has_lesion, writer.options.absent_detection)

    def make(drawn: AbsentQuestion) -> dict:
        return row(drawn.meta["asked"], drawn.question, drawn.answer, meta_update=drawn.meta)

    asked = [r["messages"][0]["content"].removeprefix("<image>") for r in rows]
    return absent_rows(scene, count, writer.absent_rng, make, asked)


# each takes ``row(task, question, answer, **fields)``, which makes one row of the scan image
def _segmentation_rows(
    row, rng: np.random.Generator, organs: dict, lesions: list, mask_ref, phrasing: np.random.Generator
) -> list[dict]:
    """Two prompts naming different targets in the same image: an organ, then the lesion(s) or none — "the
    lesion" or "every lesion" as :func:`~citrus_v.data.volume_rows.asks_every_lesion` draws from ``phrasing``."""
    organ_names = list(organs)
    organ = organ_names[int(rng.integers(0, len(organ_names)))]
    rows = [
        # the answer names its target: the [SEG] state then carries which one (see modeling/point_head.py)
        row("segmentation", f"Please segment the {organ} in this image.",
            f"Sure, here is the {organ} [SEG].", masks=[mask_ref(organ, organs[organ])])
    ]
    every = asks_every_lesion(len(lesions), phrasing)
    question = "Segment every lesion." if every else "Segment the lesion."
    if not lesions:
        rows.append(row("segmentation", question, "There is no lesion in this image.",
                        meta_update=absent_meta("lesion", "lesion_free", "segmentation")))
    elif not every:
        rows.append(row("segmentation", question, "Sure, here is the lesion [SEG].",
                        masks=[mask_ref("lesion_1", lesions[0][1])]))
    else:
        rows.append(row("segmentation", question, every_lesion_answer(len(lesions)),
                        masks=[mask_ref(f"lesion_{k + 1}", m) for k, (_, m) in enumerate(lesions)]))
    return rows


def _detection_rows(row, rng: np.random.Generator, organs: dict, lesions: list) -> list[dict]:
    """The lesions' boxes, or one organ's box; no row when the image shows neither."""
    organ_names = list(organs)
    if lesions and rng.uniform() < 0.6:
        target, boxes = "lesion", [_bbox(m) for _, m in lesions]
    elif organ_names:
        target = organ_names[int(rng.integers(0, len(organ_names)))]
        boxes = [_bbox(organs[target])]
    else:
        target, boxes = "", []
    if not boxes:
        return []
    answer = "```json\n[\n" + ",\n".join([DETECTION_ANSWER_ITEM] * len(boxes)) + "\n]\n```"
    objects = {"ref": [target] * len(boxes), "bbox": boxes}
    return [row("detection", DETECTION_PROMPT.format(target), answer, objects=objects)]


def _closed_question(row, rng: np.random.Generator, lesions: list) -> dict:
    """The lesion's side, its presence, or the lesion count."""
    hosts = [lesion.host for lesion, _ in lesions]
    sides = {_side(h) for h in hosts}
    kind = ["presence", "count"][int(rng.integers(0, 2))]
    if len(hosts) and len(sides) == 1 and None not in sides and rng.uniform() < 0.5:
        paired = hosts[0].split()[-1]
        return row("vqa-closed", f"Is the lesion in the left or the right {paired}?", sides.pop())
    if kind == "presence":
        return row("vqa-closed", "Is there a lesion in this image? Answer yes or no.", "yes" if lesions else "no")
    return row("vqa-closed", "How many lesions are there in this image?", str(len(lesions)))


def _open_question(row, rng: np.random.Generator, lesions: list, anatomy: Anatomy) -> dict:
    """The organ holding the lesion, the modality, or the body region."""
    hosts = [lesion.host for lesion, _ in lesions]
    if len(set(hosts)) == 1 and rng.uniform() < 0.5:
        return row("vqa-open", "Which organ contains the lesion?", hosts[0])
    if rng.uniform() < 0.5:
        return row("vqa-open", "What is the imaging modality of this image?", MODALITY_NAMES[anatomy.modality])
    return row("vqa-open", "Which body region does this image show?", anatomy.region)


def _report_row(row, organs: dict, lesions: list, anatomy: Anatomy) -> dict:
    """A radiology report: the organs shown, each lesion with its diameter, and an impression."""
    modality, region, spacing = anatomy.modality, anatomy.region, anatomy.spacing_mm
    organ_names = list(organs)
    shown = ", ".join(organ_names[:-1]) + (" and " if len(organ_names) > 1 else "") + organ_names[-1] \
        if organ_names else "no organs"
    findings = [f"Findings: {MODALITY_NAMES[modality]} of the {region}. The {shown} are shown."]
    for lesion, mask in lesions:
        word = _lesion_word(modality, lesion.contrast, region)
        findings.append(f"A {_diameter_mm(mask, spacing)} mm {word} in the {lesion.host}.")
    if not lesions:
        findings.append("No focal lesion.")
    impression = f"Impression: {_plural(len(lesions), 'lesion')}." if lesions else "Impression: normal study."
    return row("report", "Write a radiology report for this image.", " ".join(findings) + " " + impression)


def _cot_row(row, rng: np.random.Generator, organs: dict, lesions: list, anatomy: Anatomy) -> dict:
    """Whether one organ holds a lesion, answered after a chain of thought about the image."""
    modality, region = anatomy.modality, anatomy.region
    organ_names = list(organs)
    organ = organ_names[int(rng.integers(0, len(organ_names)))]
    inside = [(lesion, mask) for lesion, mask in lesions if lesion.host == organ]
    image_side = "left" if organs[organ].nonzero()[1].mean() < anatomy.size / 2 else "right"
    thought = (f"This is a {MODALITY_NAMES[modality]} image of the {region}. The {organ} lies on the image's "
               f"{image_side} side.")
    if inside:
        largest = max(_diameter_mm(mask, anatomy.spacing_mm) for _, mask in inside)
        thought += f" It contains {_plural(len(inside), 'focal lesion')}, the largest {largest} mm across."
    else:
        thought += " Its signal is uniform without a focal lesion."
    return row("cot", f"Is there a lesion in the {organ}? Think step by step, then answer.",
               f"<think>{thought}</think><answer>{'yes' if inside else 'no'}</answer>")


ALL_TASKS = ("segmentation", "detection", "vqa-closed", "vqa-open", "report", "cot")


def _scan_case(writer: _CaseWriter, fmt: str) -> tuple[list[dict], int]:
    rng, options = writer.rng, writer.options
    kinds = KINDS if fmt != "nifti" else tuple(k for k in KINDS if k[0] != "X-ray")
    modality, region = kinds[int(rng.integers(0, len(kinds)))]
    meta = {"case": writer.case, "modality": modality, "region": region, "format": fmt}
    if fmt != "nifti":
        anatomy = make_anatomy(rng, modality, region, options.size)
        view = anatomy.render(rng)
        image = writer.png_image(view.values, (modality, region)) if fmt == "png" else writer.dicom_image(
            view.values, anatomy
        )
        return scan_rows(writer, view, image, meta, writer.png_mask, ALL_TASKS), 1
    depth = options.volume_depth
    anatomy = make_anatomy(rng, modality, region, options.size, depth=depth)
    views = [anatomy.render(rng, z) for z in range(depth)]
    volume = writer.image_dir / f"{writer.case}.nii.gz"
    labels = writer.mask_dir / f"{writer.case}_labels.nii.gz"
    write_volume(volume, [np.rint(v.values) for v in views], (anatomy.spacing_mm, anatomy.spacing_mm, 2.5), np.int16)
    label_slices = []
    for view in views:
        label = np.zeros(view.values.shape, dtype=np.uint8)
        for index, name in enumerate(ORGANS[region]):
            label[view.organs[name]] = index + 1
        for index, mask in enumerate(view.lesions):
            label[mask] = 10 + index
        label_slices.append(label)
    write_volume(labels, label_slices, (anatomy.spacing_mm, anatomy.spacing_mm, 2.5), np.uint8)
    rows: list[dict] = []
    first = max(0, (depth - options.slices_per_volume) // 2)
    for z in range(first, min(depth, first + options.slices_per_volume)):
        window = NIFTI_WINDOWS.get((modality, region))
        image = f"{writer.rel(volume)}#slice={z}" + (f"&window={window}" if window else "")
        view = views[z]
        # an organ's mask includes the lesions inside it, as in the 2-D cases
        values = {
            name: [i + 1] + [10 + k for k, lesion in enumerate(anatomy.lesions) if lesion.host == name]
            for i, name in enumerate(ORGANS[region])
        }
        lesion_ids = {id(m): [10 + i] for i, m in enumerate(view.lesions)}

        def mask_ref(name: str, mask: np.ndarray, z=z, values=values, lesion_ids=lesion_ids) -> str:
            label = ",".join(map(str, values.get(name, lesion_ids.get(id(mask)))))
            return f"{writer.rel(labels)}#slice={z}&label={label}"

        rows += scan_rows(writer, view, image, dict(meta, slice=z), mask_ref,
                          ("segmentation", "detection", "vqa-closed"))
    return rows, 1


def _document_case(writer: _CaseWriter) -> list[dict]:
    rng = writer.rng
    report = make_lab_report(rng, writer.options.document_cell)
    path = writer.image_dir / f"{writer.case}.png"
    report.image.save(path)
    image = writer.rel(path)
    chars = writer.mask_dir / f"{writer.case}_text.png"
    Image.fromarray(report.char_map).save(chars)
    char_map = writer.rel(chars)
    meta = {"case": writer.case, "modality": "document", "region": "lab report", "format": "png"}

    def _row(task: str, meta: dict, image: str, question: str, answer: str) -> dict:
        return _task_row(task, meta, image, question, answer, char_map=char_map)

    pick = report.results[int(rng.integers(0, len(report.results)))]
    rows = [_row("document", meta, image, f"What is the {pick.name} value in this lab report?", pick.text)]
    if rng.uniform() < 0.5:
        values = {r.name: r.text for r in report.results}
        rows.append(_row("document", meta, image, "Extract every test result as JSON.",
                         "```json\n" + json.dumps(values, ensure_ascii=False) + "\n```"))
    else:
        abnormal = [f"{r.name} ({r.flag})" for r in report.results if r.flag != "normal"]
        rows.append(_row("document", meta, image, "Which results are outside the reference range?",
                         ", ".join(abnormal) if abnormal else "None; all results are within range."))
    rows.append(_row("document", meta, image, "What are the patient ID and the date of this report?",
                     f"Patient ID {report.patient_id}, date {report.date}."))
    return rows


def _document_indices(n: int, share: float, seed: list[int]) -> set[int]:
    """Which of ``n`` images are lab reports: ``share`` of them, drawn with ``seed`` (none below 10 images)."""
    count = round(share * n) if n >= 10 else 0
    return set(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist()) if count else set()


def write_corpus(out: str | Path, options: CorpusOptions | None = None) -> CorpusSummary:
    """Generate the corpus into ``out`` (created if needed; existing split files are replaced)."""
    options = options or CorpusOptions()
    _check_options(options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = CorpusSummary(out)
    balance = AbsentBalance(options.absent_share)
    volume_share = options.absent_share if options.volume_absent_share is None else options.volume_absent_share
    handles = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        # images first, then volumes and clips: each kind draws from its own streams, so adding volumes or
        # clips leaves the image rows as they were
        for split, fmt, rows in itertools.chain(_image_cases(out, options, balance),
                                                _stack_cases(out, options, AbsentBalance(volume_share))):
            for row in rows:
                row["meta"]["split"] = split
                handles[split].write(json.dumps(row, ensure_ascii=False) + "\n")
                summary.tasks[row["task"]] += 1
            summary.rows[split] = summary.rows.get(split, 0) + len(rows)
            summary.images[split] = summary.images.get(split, 0) + 1
            summary.formats[fmt] += 1
    finally:
        for handle in handles.values():
            handle.close()
    return summary


def _check_options(options: CorpusOptions) -> None:
    """Refuse options that cannot make a corpus, naming the flag and the fix."""
    if options.n < 1:
        raise ValueError("--n must be at least 1")
    for name in ("test_images", "train_documents", "volumes", "test_volumes", "clips"):
        if getattr(options, name) < 0:
            raise ValueError(f"--{name} must be 0 or more, got {getattr(options, name)}")
    for name in ("absent_share", "volume_absent_share"):
        share = getattr(options, name)
        if share is not None and not 0.0 <= share < 1.0:
            raise ValueError(f"--{name} must be at least 0 and below 1, got {share}")
    for name, least in (("volume_slices", 4), ("volume_size", 32), ("clip_frames", 2)):
        low, high = getattr(options, name)
        if not least <= low <= high:
            raise ValueError(f"--{name} must be a range LOW HIGH with {least} <= LOW <= HIGH, got {low} {high}")
    if options.clip_size < 32:
        raise ValueError(f"--clip_size must be at least 32 pixels, got {options.clip_size}")


def _image_cases(out: Path, options: CorpusOptions, balance: AbsentBalance) -> Iterator[tuple[str, str, list[dict]]]:
    """``(split, format, rows)`` of each source image (scans and lab reports), in order."""
    splits = split_of(options.n, options.seed) + ["test"] * options.test_images
    documents = _document_indices(options.n, options.documents, [options.seed, 104729])
    # the extra test images draw their lab reports apart, so the first n images stay as they were
    extra = _document_indices(options.test_images, options.documents, [options.seed, 130363])
    documents |= {options.n + index for index in extra}
    # then the extra training reports, after every held-out image
    documents |= set(range(len(splits), len(splits) + options.train_documents))
    splits += ["train"] * options.train_documents
    for index in range(len(splits)):
        split = splits[index]
        rng = np.random.default_rng([options.seed, index])
        absent_rng = np.random.default_rng([options.seed, index, ABSENT_STREAM])
        phrasing_rng = np.random.default_rng([options.seed, index, PHRASING_STREAM])
        writer = _CaseWriter(out, split, f"case_{index:05d}", options, rng, phrasing_rng, balance, absent_rng)
        if index in documents:
            yield split, "document", _document_case(writer)
            continue
        fmt = ("png", "dicom", "nifti")[int(rng.choice(3, p=np.array(options.formats) / sum(options.formats)))]
        yield split, fmt, _scan_case(writer, fmt)[0]


def _stack_cases(out: Path, options: CorpusOptions, balance: AbsentBalance) -> Iterator[tuple[str, str, list[dict]]]:
    """``(split, format, rows)`` of each volume, then each clip (split 80/10/10 by case, apart from images)."""
    splits = split_of(options.volumes, options.seed, VOLUME_STREAM) + ["test"] * options.test_volumes
    for index, split in enumerate(splits):
        rows = volume_case(out, split, f"vol_{index:05d}", options, [options.seed, VOLUME_STREAM, index], balance)
        yield split, "volume", rows
    for index, split in enumerate(split_of(options.clips, options.seed, CLIP_STREAM)):
        yield split, "clip", clip_case(out, split, f"clip_{index:05d}", options, [options.seed, CLIP_STREAM, index],
                                       balance)
