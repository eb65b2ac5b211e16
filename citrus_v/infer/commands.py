"""``citrus-v infer``: answer one question about one image, several images or a folder of them, with one model
load; write the overlay and the masks.

Outputs, in ``--out`` for one image and in ``--out/<image stem>/`` for each of several: ``prediction.json``
(text, boxes, mask scores and files; written first, so no later failure loses the answer), ``overlay.png``
(masks and boxes drawn, with a legend), ``mask_K.png`` for every mask, and the masks in the input's own format
(:mod:`~citrus_v.infer.mask_files`): ``mask_K.nii.gz`` on the source volume's grid for NIfTI, one DICOM
Segmentation ``masks.seg.dcm`` for DICOM. A format that cannot be written is named in ``not_written``.

A volume or clip — a DICOM series folder or zip, a NIfTI file of several slices, a multi-frame DICOM, a video
— is asked about as a whole, with a 3-D mask per ``[SEG]`` (:mod:`~citrus_v.infer.volume_infer`), unless one
slice or frame is named (``#slice=``, ``#frame=``, ``--slice``, ``--frame``).
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
from .mask_frames import DEFAULT_MAX_FRAMES
from .results import Prediction
from .volume_infer import VolumeSource, infer_volume, series_folder, volume_source


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
    """Read a PNG/JPEG, one NIfTI slice (middle by default) or one DICOM frame as the image to ask about; a
    reference's own ``#slice=``/``#axis=``/``#frame=``/``#window=`` win over the arguments."""
    from ..media import MediaRef, parse_ref, read_image, read_nifti

    ref = parse_ref(str(path))
    kind = ref.kind
    slice_index = slice_index if ref.slice is None else ref.slice
    axis = axis if ref.axis is None else ref.axis
    frame = frame if ref.frame is None else ref.frame
    window = window if ref.window is None else ref.window
    if kind == "nifti":
        volume = read_nifti(ref.path, ref.t)
        count = volume.num_slices(axis)
        index = count // 2 if slice_index is None else int(slice_index)
        image = read_image(MediaRef(ref.path, axis=axis, slice=index, t=ref.t, window=window))
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


def image_paths(arguments: Sequence[str | Path], notes: list[str] | None = None) -> tuple[list[Path], int]:
    """The images named on the command line: files as given, and for a folder every file in it (not its
    sub-folders, nor hidden files) whose name is an image's — DICOM, NIfTI, a format Pillow opens, or a file
    without suffix (DICOM often has none) — sorted by name. A folder whose images are the DICOM slices of one
    series is one volume, kept as the folder itself. Also returns how many other files were ignored; ``notes``
    gets why a folder of DICOM files is not read as one volume."""
    from ..media import DICOM_SUFFIXES, NIFTI_SUFFIXES

    image_suffixes = {s.lower() for s in Image.registered_extensions()} | set(DICOM_SUFFIXES) | {".nii"}
    paths: list[Path] = []
    ignored = 0
    for argument in arguments:
        path = Path(argument).expanduser()
        if not path.is_dir():
            paths.append(path)  # a reference's #slice=/#frame= options stay in it
            continue
        one_volume, why_not = series_folder(path)
        if why_not and notes is not None:
            notes.append(why_not)
        if one_volume:
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
        help="answer a question about one image, several, or a folder of them, or about a volume or clip; write "
        "the overlays and masks",
        description="Answer one question about each image with one model load. With one image the files go "
        "in --out; with several, in --out/<image stem>/. A volume or clip (a DICOM series folder or zip, a NIfTI "
        "of several slices, a multi-frame DICOM, a video) is asked about as a whole and gets a 3-D mask per [SEG] "
        "(mask_K.nii.gz on its grid, masks.seg.dcm for DICOM), unless #slice=/#frame= or --slice/--frame name one "
        "image of it. Exit status: 0 when every image was answered, 1 when "
        "some were skipped (each named with its reason) or the model could not load, 2 when none was readable.",
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--image",
        required=True,
        nargs="+",
        help="one or more images (PNG/JPEG, DICOM, NIfTI .nii/.nii.gz), volumes or clips (NIfTI, a DICOM series "
        "folder or .zip, a multi-frame DICOM, a video), or folders; a folder gives every image file directly in it, "
        "sorted by name, unless its files are one DICOM series: then it is one volume",
    )
    parser.add_argument("--query", required=True, help="the question, e.g. 'Please segment the lesion.'")
    parser.add_argument(
        "--out", default="infer_out", help="output folder; with several images, one sub-folder per image"
    )
    parser.add_argument(
        "--slice", type=int, default=None,
        help="NIfTI: ask about this one slice (a 2-D image); the whole volume when not given",
    )
    parser.add_argument(
        "--axis", type=int, default=2, choices=[0, 1, 2],
        help="NIfTI: slice axis in RAS+ (2: axial); the frames of a volume run along it",
    )
    parser.add_argument(
        "--frame", type=int, default=None,
        help="multi-frame DICOM: ask about this one frame (a 2-D image); the whole stack when not given",
    )
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
    parser.add_argument(
        "--propagation",
        default=None,
        choices=["memory", "per_frame"],
        help="volumes and clips: how a [SEG] becomes a mask on every frame — memory (SAM 2's memory carries it "
        "from the frame with the highest object score) or per_frame (the prompt on each frame alone); memory when "
        "the checkpoint has SAM 2's memory modules, else per_frame, when not given",
    )
    parser.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="volumes and clips: the most frames SAM 2 segments (a longer source is segmented on this many evenly "
        "spaced frames, and prediction.json notes it); the frames the language model reads follow ms-swift's "
        "FPS_MAX_FRAMES and VIDEO_MAX_PIXELS",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``citrus-v infer``."""
    from ..media import MedicalImageError

    notes: list[str] = []
    paths, ignored = image_paths(args.image, notes)
    for note in notes:
        print(f"citrus-v infer: {note}", file=sys.stderr)
    if not paths:
        print(f"citrus-v infer: no image files in {', '.join(map(str, args.image))}", file=sys.stderr)
        return 2
    folders = output_folders(paths, Path(args.out))
    if len(paths) == 1:  # one image: an unreadable one is refused before the model loads
        try:
            first = _source(paths[0], args)
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


def _source(path: Path, args: argparse.Namespace) -> Source | VolumeSource:
    """A volume or clip to ask about as a whole, else the 2-D image (headers read; a 2-D image decoded)."""
    volume = volume_source(path, args.slice, args.axis, args.frame, args.window)
    return volume if volume is not None else load_source(path, args.slice, args.axis, args.frame, args.window)


def _load_predictor(args: argparse.Namespace):
    """The predictor for ``--model`` on ``--device``, or ``None`` after saying why it could not load."""
    import torch

    from ..checkpoint_layout import CheckpointError
    from .predictor import CitrusVPredictor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return CitrusVPredictor.from_pretrained(
            args.model, device=device, propagation=args.propagation, max_frames=args.max_frames
        )
    except (CheckpointError, OSError, ValueError) as err:
        print(f"citrus-v infer: cannot load {args.model}: {err}", file=sys.stderr)
        return None


def _ask(predictor, source: Source | VolumeSource, out: Path, args: argparse.Namespace) -> dict | None:
    """``infer_file`` (``infer_volume`` for a volume or clip) with the command line's settings; ``None`` after
    naming a missing extra. A volume whose frames cannot be decoded raises ``MedicalImageError``."""
    ask = infer_volume if isinstance(source, VolumeSource) else infer_file
    try:
        return ask(
            predictor, source, args.query, out, system=args.system,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        )
    except ImportError as err:  # DICOM-SEG and RLE outputs come with the `serve` extra
        print(f"citrus-v infer: {err.name} is needed for this output: pip install 'citrus-v[serve]'", file=sys.stderr)
        return None


def _answer_one(predictor, source: Source | VolumeSource, out: Path, args: argparse.Namespace) -> int:
    """One image: the answer on stdout, files directly in ``out``."""
    from ..media import MedicalImageError
    from ..processing.processor import ProcessorError

    try:
        result = _ask(predictor, source, out, args)
    except (MedicalImageError, ProcessorError) as err:  # a volume's frames, decoded only now
        print(f"citrus-v infer: {err}", file=sys.stderr)
        return 2
    if result is None:
        return 1
    print(result["answer"])
    for line in [*result.get("notes", []), *result["not_written"]]:
        print(f"citrus-v infer: {line}", file=sys.stderr)
    files = [f for f in [result["files"]["overlay"], *result["files"]["masks"]] if f]
    print(f"{_counts(result)}; wrote {', '.join(files)} and {out / 'prediction.json'}", file=sys.stderr)
    return 0


def _counts(result: dict) -> str:
    """What was found: masks and boxes (and for a volume, how many masks SAM 2 found present)."""
    masks = result["masks"]
    if "video" not in result:
        return f"{len(masks)} mask(s), {len(result['boxes'])} box(es)"
    present = sum(1 for m in masks if m["present"])
    return f"{len(masks)} 3-D mask(s), {present} present, on {result['video']['segmented_frames']} frame(s)"


def _answer_many(
    predictor, paths: Sequence[Path], folders: Sequence[Path], ignored: int, args: argparse.Namespace
) -> int:
    """Several images: each answer on stdout after its image's path, files in its own folder, a progress bar
    on a terminal, and a summary line; an unreadable image is skipped with its reason and the run goes on."""
    from tqdm import tqdm

    from ..media import MedicalImageError
    from ..processing.processor import ProcessorError

    done = RunSummary(ignored=ignored)
    for path, out in tqdm(list(zip(paths, folders, strict=True)), desc="infer", unit="image", disable=None):
        try:
            source = _source(path, args)
            result = _ask(predictor, source, out, args)
        except (MedicalImageError, FileNotFoundError, ProcessorError) as err:
            reason = str(err) if str(path) in str(err) else f"{path}: {err}"  # the readers name the file
            done.skipped.append((path, reason))
            tqdm.write(f"citrus-v infer: skipped {reason}", file=sys.stderr)
            continue
        if result is None:
            return 1
        done.answered.append(path)
        tqdm.write(f"{path}: {result['answer']}")
        for line in [*result.get("notes", []), *result["not_written"]]:
            tqdm.write(f"citrus-v infer: {path}: {line}", file=sys.stderr)
    print(f"citrus-v infer: {done.line()}; outputs in {args.out}/<image>/", file=sys.stderr)
    for _path, reason in done.skipped:
        print(f"  skipped {reason}", file=sys.stderr)
    if not done.answered:
        return 2
    return 1 if done.skipped else 0
