"""``citrus-v infer``: answer one question about one image, several images or a folder of them, with one model
load; write the overlay and the masks.

Outputs, in ``--out`` for one image and in ``--out/<image stem>/`` for each of several: ``prediction.json``
(text, boxes, mask scores and files; written first, so no later failure loses the answer), ``overlay.png``
(masks and boxes drawn, with a legend), ``mask_K.png`` for every mask, and the masks in the input's own format
(:mod:`~citrus_v.infer.mask_files`): ``mask_K.nii.gz`` on the source volume's grid for NIfTI, one DICOM
Segmentation ``masks.seg.dcm`` for DICOM. A format that cannot be written is named in ``not_written``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..cli_parser import MODEL_HELP
from .results import Prediction


@dataclass
class Source:
    """The image the question is about, and what is needed to write masks back in its format."""

    path: Path
    kind: str  # "raster", "nifti" or "dicom"
    image: Image.Image
    slice: int | None = None
    axis: int = 2
    frame: int | None = None
    window: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What one ``citrus-v infer`` run did: the images answered and those skipped, with the reason."""

    answered: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: int = 0  # files in a folder whose names are not images (README.txt, …)

    def line(self) -> str:
        text = f"{len(self.answered)} answered, {len(self.skipped)} skipped"
        return text + (f"; {self.ignored} non-image file(s) ignored" if self.ignored else "")


def load_source(
    path: str | Path, slice_index: int | None = None, axis: int = 2, frame: int | None = None, window: str | None = None
) -> Source:
    """Read a PNG/JPEG, one NIfTI slice (middle by default) or one DICOM frame as the image to ask about."""
    from ..media import MediaRef, parse_ref, read_image, read_nifti

    ref = parse_ref(str(path))
    kind = ref.kind
    if kind == "nifti":
        volume = read_nifti(ref.path)
        count = volume.num_slices(axis)
        index = count // 2 if slice_index is None else int(slice_index)
        image = read_image(MediaRef(ref.path, axis=axis, slice=index, window=window))
        return Source(ref.path, kind, image, slice=index, axis=axis, window=window, extra={"volume": volume})
    if kind == "dicom":
        image = read_image(MediaRef(ref.path, frame=frame, window=window))
        return Source(ref.path, kind, image, frame=frame, window=window)
    return Source(ref.path, kind, read_image(MediaRef(ref.path, window=window)), window=window)


def write_masks(source: Source, prediction: Prediction, out: Path) -> tuple[list[Path], list[str]]:
    """Write the prediction's masks: one PNG each, always, and also in the source's own format (NIfTI on the
    source grid, or one DICOM Segmentation). Returns the files written and, for a format that could not be
    written, one line naming it and why — the other files stand."""
    from .mask_files import write_dicom_seg, write_nifti_masks, write_png_masks

    if not prediction.masks:
        return [], []
    arrays = [item.mask for item in prediction.masks]
    labels = [item.label for item in prediction.masks]
    files = write_png_masks(arrays, out)
    seg_path = out / "masks.seg.dcm"
    writers: dict[str, tuple[str, Callable[[], list[Path]]]] = {
        "nifti": ("NIfTI", lambda: write_nifti_masks(source.path, arrays, int(source.slice or 0), source.axis, out)),
        "dicom": ("DICOM-SEG", lambda: [write_dicom_seg(source.path, arrays, labels, seg_path, source.frame)]),
    }
    if source.kind not in writers:
        return files, []
    name, writer = writers[source.kind]
    try:
        files += writer()
    except ImportError:
        raise  # a missing extra: the caller says which one to install
    except Exception as err:  # highdicom and nibabel raise many types for a source they cannot follow
        return files, [f"{name} not written ({type(err).__name__}: {err}); the PNG masks stand"]
    return files, []


def summary(prediction: Prediction, source: Source, files: dict[str, Any]) -> dict[str, Any]:
    """What ``prediction.json`` holds."""
    return {
        "text": prediction.text,
        "answer": prediction.answer,
        "think": prediction.think,
        "image": {
            "path": str(source.path),
            "kind": source.kind,
            "size": {"width": source.image.width, "height": source.image.height},
            "slice": source.slice,
            "axis": source.axis if source.kind == "nifti" else None,
            "frame": source.frame,
            "window": source.window,
        },
        "boxes": [{"bbox_2d": [b.x1, b.y1, b.x2, b.y2], "label": b.label or None} for b in prediction.boxes],
        "masks": [
            {
                "index": m.index,
                "label": m.label,
                "score": m.score,
                "area": m.area,
                "bbox_xyxy": m.bbox,
            }
            for m in prediction.masks
        ],
        "files": files,
    }


def infer_file(predictor, source: Source, query: str, out: Path, system: str | None = None, **generation) -> dict:
    """Ask ``query`` about ``source``, write the overlay, the masks and ``prediction.json`` to ``out``."""
    from ..tokens import IMAGE_PLACEHOLDER
    from .overlay import OVERLAY_SIDE, draw_overlay

    prompt = query if IMAGE_PLACEHOLDER in query else IMAGE_PLACEHOLDER + query
    prediction = predictor.predict(source.image, prompt, system=system, **generation)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "prediction.json"
    # the answer first: nothing written after it can lose it
    result = summary(prediction, source, {"overlay": None, "masks": []})
    record.write_text(json.dumps(result, indent=2) + "\n")
    overlay_path = out / "overlay.png"
    draw_overlay(source.image, prediction.masks, prediction.boxes, side=OVERLAY_SIDE).save(overlay_path)
    masks, problems = write_masks(source, prediction, out)
    result = summary(prediction, source, {"overlay": str(overlay_path), "masks": [str(p) for p in masks]})
    result["not_written"] = problems
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def image_paths(arguments: Sequence[str | Path]) -> tuple[list[Path], int]:
    """The images named on the command line: files as given, and for a folder every file in it (not its
    sub-folders, nor hidden files) whose name is an image's — DICOM, NIfTI, a format Pillow opens, or a file
    without suffix (DICOM often has none) — sorted by name. Also returns how many other files were ignored."""
    from ..media import DICOM_SUFFIXES, NIFTI_SUFFIXES

    image_suffixes = {s.lower() for s in Image.registered_extensions()} | set(DICOM_SUFFIXES) | {".nii"}
    paths: list[Path] = []
    ignored = 0
    for argument in arguments:
        path = Path(argument).expanduser()
        if not path.is_dir():
            paths.append(path)
            continue
        for child in sorted(path.iterdir()):
            if child.name.startswith(".") or not child.is_file():
                continue
            name = child.name.lower()
            if name.endswith(NIFTI_SUFFIXES) or child.suffix.lower() in image_suffixes or child.suffix == "":
                paths.append(child)
            else:
                ignored += 1
    return paths, ignored


def output_folders(paths: Sequence[Path], out: Path) -> list[Path]:
    """``out`` for one image; ``out/<stem>`` for each of several (``scan.nii.gz`` -> ``scan``), the whole
    file name where two stems meet (``a.png`` and ``a.dcm`` -> ``a.png``, ``a.dcm``), and a ``-2``, ``-3`` …
    suffix where even those meet (the same name in two folders)."""
    if len(paths) == 1:
        return [out]
    stems = [_stem(p) for p in paths]
    names = [p.name if stems.count(s) > 1 else s for p, s in zip(paths, stems, strict=True)]
    seen: dict[str, int] = {}
    folders = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        folders.append(out / (name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return folders


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem or name


def add_parser(sub) -> None:
    """Register ``infer``."""
    parser = sub.add_parser(
        "infer",
        help="answer a question about one image, several, or a folder of them; write the overlays and masks",
        description="Answer one question about each image with one model load. With one image the files go "
        "in --out; with several, in --out/<image stem>/. Exit status: 0 when every image was answered, 1 when "
        "some were skipped (each named with its reason) or the model could not load, 2 when none was readable.",
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--image",
        required=True,
        nargs="+",
        help="one or more images (PNG/JPEG, DICOM, NIfTI .nii/.nii.gz) or folders; a folder gives every image "
        "file directly in it, sorted by name",
    )
    parser.add_argument("--query", required=True, help="the question, e.g. 'Please segment the lesion.'")
    parser.add_argument(
        "--out", default="infer_out", help="output folder; with several images, one sub-folder per image"
    )
    parser.add_argument("--slice", type=int, default=None, help="NIfTI: slice index; the middle one when not given")
    parser.add_argument("--axis", type=int, default=2, choices=[0, 1, 2], help="NIfTI: slice axis in RAS+ (2: axial)")
    parser.add_argument("--frame", type=int, default=None, help="multi-frame DICOM: frame index; 0 when not given")
    parser.add_argument(
        "--window",
        default=None,
        help="CT window: a preset (ct-abdomen, ct-lung, ct-bone, ct-brain, ct-liver), 'C,W', or 'file'; "
        "the file's own window, else the full range, when not given",
    )
    parser.add_argument("--system", default=None, help="system prompt; the processor's when not given")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="most tokens to generate per answer")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 picks the likeliest token (greedy)"
    )
    parser.add_argument("--device", default=None, help="torch device; cuda when available, else cpu, when not given")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``citrus-v infer``."""
    from ..media import MedicalImageError

    paths, ignored = image_paths(args.image)
    if not paths:
        print(f"citrus-v infer: no image files in {', '.join(map(str, args.image))}", file=sys.stderr)
        return 2
    folders = output_folders(paths, Path(args.out))
    if len(paths) == 1:  # one image: an unreadable one is refused before the model loads
        try:
            first = load_source(paths[0], args.slice, args.axis, args.frame, args.window)
        except (MedicalImageError, FileNotFoundError) as err:
            print(f"citrus-v infer: {err}", file=sys.stderr)
            return 2
        predictor = _load_predictor(args)
        if predictor is None:
            return 1
        return _answer_one(predictor, first, folders[0], args)
    predictor = _load_predictor(args)
    if predictor is None:
        return 1
    return _answer_many(predictor, paths, folders, ignored, args)


def _load_predictor(args: argparse.Namespace):
    """The predictor for ``--model`` on ``--device``, or ``None`` after saying why it could not load."""
    import torch

    from ..checkpoint_layout import CheckpointError
    from .predictor import CitrusVPredictor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return CitrusVPredictor.from_pretrained(args.model, device=device)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"citrus-v infer: cannot load {args.model}: {err}", file=sys.stderr)
        return None


def _ask(predictor, source: Source, out: Path, args: argparse.Namespace) -> dict | None:
    """``infer_file`` with the command line's settings; ``None`` after naming a missing extra."""
    try:
        return infer_file(
            predictor, source, args.query, out, system=args.system,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        )
    except ImportError as err:  # DICOM-SEG and RLE outputs come with the `serve` extra
        print(f"citrus-v infer: {err.name} is needed for this output: pip install 'citrus-v[serve]'", file=sys.stderr)
        return None


def _answer_one(predictor, source: Source, out: Path, args: argparse.Namespace) -> int:
    """One image: the answer on stdout, files directly in ``out``."""
    result = _ask(predictor, source, out, args)
    if result is None:
        return 1
    print(result["answer"])
    for problem in result["not_written"]:
        print(f"citrus-v infer: {problem}", file=sys.stderr)
    files = [result["files"]["overlay"], *result["files"]["masks"]]
    print(
        f"{len(result['masks'])} mask(s), {len(result['boxes'])} box(es); wrote {', '.join(files)} and "
        f"{out / 'prediction.json'}",
        file=sys.stderr,
    )
    return 0


def _answer_many(
    predictor, paths: Sequence[Path], folders: Sequence[Path], ignored: int, args: argparse.Namespace
) -> int:
    """Several images: each answer on stdout after its image's path, files in its own folder, a progress bar
    on a terminal, and a summary line; an unreadable image is skipped with its reason and the run goes on."""
    from tqdm import tqdm

    from ..media import MedicalImageError

    done = RunSummary(ignored=ignored)
    for path, out in tqdm(list(zip(paths, folders, strict=True)), desc="infer", unit="image", disable=None):
        try:
            source = load_source(path, args.slice, args.axis, args.frame, args.window)
        except (MedicalImageError, FileNotFoundError) as err:
            reason = str(err) if str(path) in str(err) else f"{path}: {err}"  # the readers name the file
            done.skipped.append((path, reason))
            tqdm.write(f"citrus-v infer: skipped {reason}", file=sys.stderr)
            continue
        result = _ask(predictor, source, out, args)
        if result is None:
            return 1
        done.answered.append(path)
        tqdm.write(f"{path}: {result['answer']}")
        for problem in result["not_written"]:
            tqdm.write(f"citrus-v infer: {path}: {problem}", file=sys.stderr)
    print(f"citrus-v infer: {done.line()}; outputs in {args.out}/<image>/", file=sys.stderr)
    for _path, reason in done.skipped:
        print(f"  skipped {reason}", file=sys.stderr)
    if not done.answered:
        return 2
    return 1 if done.skipped else 0
