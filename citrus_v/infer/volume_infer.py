"""``citrus-v infer`` on a volume or clip: one question about the whole stack, one 3-D mask per ``[SEG]``.

A source is a volume or clip (:func:`volume_source`) when it is a folder of one DICOM series (chosen by the
command's folder listing), a ``.zip`` of DICOM slices, a NIfTI file with more than one slice along the axis, a
DICOM file with more than one frame, or a video file — unless one slice or frame is asked for (``#slice=``,
``#frame=``, ``--slice``, ``--frame``): then it is a 2-D image, as before. The language model reads it through
the video path; SAM 2 segments every frame (see :mod:`~citrus_v.infer.volume_segmentation`).

Outputs in the output folder: ``prediction.json`` first (the answer, and per mask its label, whether SAM 2 found
the target, the frames with mask, the volume in mL, spacing, per-frame areas and the 3-D box), then
``mask_K.nii.gz`` on the source's grid (K from 1, one per ``[SEG]``, empty where the target is not present),
``masks.seg.dcm`` for a DICOM source, and ``overlay.png`` (three planes through each mask for a volume, a strip
of frames for a clip). A file that cannot be written is named in ``not_written``; the others stand.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..media import DICOM_SUFFIXES, MediaRef, MedicalImageError, probe_volume
from ..media.volume import Volume
from ..tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .results import VolumeMask

# the options a volume reference's fragment may carry (media.volumes): the whole stack's, not one slice's
_VOLUME_KEYS = {"axis", "t", "window", "series"}
_IMAGE_KEYS = {"slice", "frame", "label"}


@dataclass
class VolumeSource:
    """A volume or clip to ask about: its path, what it is (``nifti``, ``dicom_series``, ``dicom``, ``video``),
    and the reference the readers take (the path with its ``axis``/``t``/``window``/``series`` options)."""

    path: Path
    format: str
    reference: str
    window: str | None = None


def volume_source(
    argument: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    frame: int | None = None,
    window: str | None = None,
) -> VolumeSource | None:
    """The volume or clip ``argument`` names, or ``None`` for a 2-D image (see the module docstring). The flags
    fill options the reference's fragment does not set. A header that cannot be read raises
    ``MedicalImageError`` naming the file."""
    from ..media.volumes import parse_volume_ref, source_format

    path_text, options = _split_fragment(str(argument))
    if "slice" in options or "frame" in options:
        return None
    path = Path(path_text).expanduser()
    try:
        kind = source_format(path)
    except MedicalImageError:  # a picture, or a missing file: the 2-D path says which
        return None
    if (kind == "nifti" and slice_index is not None) or (kind == "dicom" and frame is not None):
        return None
    options.setdefault("window", window)
    if kind == "nifti":
        options.setdefault("axis", axis)
    reference = _with_fragment(path_text, options)
    parse_volume_ref(reference)  # a bad option is refused here, naming the reference
    if kind in ("nifti", "dicom") and probe_volume(reference).num_frames < 2:
        return None
    return VolumeSource(path, kind, reference, None if options["window"] is None else str(options["window"]))


def _split_fragment(text: str) -> tuple[str, dict[str, Any]]:
    """The path and the ``#key=value`` options of a reference (a ``#`` in a file name stays in the path)."""
    head, hash_, fragment = text.rpartition("#")
    pairs = parse_qsl(fragment, keep_blank_values=True) if hash_ else []
    if pairs and all(key in _VOLUME_KEYS | _IMAGE_KEYS for key, _ in pairs):
        return head, dict(pairs)
    return text, {}


def _with_fragment(path_text: str, options: dict[str, Any]) -> str:
    given = {key: value for key, value in options.items() if value is not None}
    return path_text + ("#" + urlencode(given) if given else "")


def series_folder(folder: Path) -> tuple[bool, str | None]:
    """Whether a folder is read as one volume: its image files are all DICOM and form one series of more than
    one frame. Also returns why a folder of DICOM files is not (its files are then answered one by one)."""
    children = [c for c in sorted(folder.iterdir()) if c.is_file() and not c.name.startswith(".")]
    dicom = [c for c in children if _is_dicom(c)]
    if not dicom or any(_is_picture(c) for c in children):
        return False, None
    try:
        with warnings.catch_warnings():  # the series reader names stray files; the listing counts them
            warnings.simplefilter("ignore", UserWarning)
            header = probe_volume(folder)
    except MedicalImageError as err:
        return False, f"{folder} is not read as one volume ({err}); its files are answered one by one"
    return header.num_frames > 1, None


def _is_dicom(path: Path) -> bool:
    try:
        return MediaRef(path).kind == "dicom"
    except MedicalImageError:
        return False


def _is_picture(path: Path) -> bool:
    """A raster image (PNG, JPEG, ...) or a NIfTI file: a folder holding one is a folder of images."""
    from PIL import Image

    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return False
    return name.endswith((".nii", ".nii.gz")) or path.suffix.lower() in Image.registered_extensions()


def volume_prompt(query: str) -> str:
    """The question with one ``<video>`` (an ``<image>`` in it stands for the volume)."""
    if VIDEO_PLACEHOLDER in query:
        return query
    if IMAGE_PLACEHOLDER in query:
        return query.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, 1)
    return VIDEO_PLACEHOLDER + query


def infer_volume(predictor, source: VolumeSource, query: str, out: Path, system: str | None = None, **generation):
    """Ask ``query`` about ``source``; write ``prediction.json`` (first), the 3-D masks and the overlay to ``out``."""
    prediction = predictor.predict(None, volume_prompt(query), system=system, videos=[source.reference], **generation)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "prediction.json"
    # the answer first: nothing written after it can lose it
    result = volume_summary(prediction, source, {"overlay": None, "masks": []})
    record.write_text(json.dumps(result, indent=2) + "\n")
    files, problems = write_volume_files(prediction, out, source.window)
    result = volume_summary(prediction, source, files)
    result["not_written"] = problems
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _mask_volume(prediction) -> Volume:
    """The frames the masks are on (SAM 2's), or without masks the frames the language model saw."""
    if prediction.volume_masks:
        return prediction.volume_masks[0].volume
    return prediction.videos[0].volume


def write_volume_files(prediction, out: Path, window: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """``mask_K.nii.gz`` per mask on the source grid, ``masks.seg.dcm`` for a DICOM source, and ``overlay.png``.
    Returns the files written and one line per file that could not be, naming it and why."""
    from .volume_masks import write_volume_nifti, write_volume_seg
    from .volume_pictures import volume_picture

    masks: list[VolumeMask] = prediction.volume_masks
    volume = _mask_volume(prediction)
    stacks, labels = [m.mask for m in masks], [m.label for m in masks]
    files: dict[str, Any] = {"overlay": None, "masks": []}
    problems: list[str] = []

    def attempt(name: str, write: Callable[[], list[Path]]) -> list[str]:
        try:
            return [str(path) for path in write()]
        except ImportError:
            raise  # a missing extra: the caller says which one to install
        except Exception as err:  # nibabel, highdicom and Pillow raise many types for a source they cannot follow
            problems.append(f"{name} not written ({type(err).__name__}: {err}); the other files stand")
            return []

    if masks:
        files["masks"] += attempt("NIfTI", lambda: write_volume_nifti(volume, stacks, out))
        if volume.datasets and not any(stack.any() for stack in stacks):
            problems.append("DICOM-SEG not written: no mask holds a voxel (SAM 2 found no target on any frame)")
        elif volume.datasets:
            seg_path = out / "masks.seg.dcm"
            files["masks"] += attempt("DICOM-SEG", lambda: write_volume_seg(volume, stacks, labels, seg_path))
    overlay = out / "overlay.png"
    written = attempt("overlay", lambda: [_save(volume_picture(volume, stacks, labels, window), overlay)])
    files["overlay"] = written[0] if written else None
    return files, problems


def _save(picture, path: Path) -> Path:
    picture.save(path)
    return path


def volume_summary(prediction, source: VolumeSource, files: dict[str, Any]) -> dict[str, Any]:
    """What ``prediction.json`` holds for a volume or clip."""
    volume = _mask_volume(prediction)
    seen = prediction.videos[0]
    return {
        "text": prediction.text,
        "answer": prediction.answer,
        "think": prediction.think,
        "video": {
            "path": str(source.path),
            "reference": source.reference,
            "format": source.format,
            "kind": volume.kind,
            "frame_size": {"width": volume.frame_shape[1], "height": volume.frame_shape[0]},
            "spacing": None if volume.spacing is None else [float(s) for s in volume.spacing],
            "window": source.window,
            "model_frames": sorted(set(seen.source_frames)),  # the frames the language model saw
            # the frames SAM 2 segmented: every one of the source's, unless a note says otherwise
            "segmented_frames": volume.num_frames if prediction.volume_masks else 0,
            "segmented_source_frames": None if volume.source_frames is None else list(volume.source_frames),
        },
        "boxes": [{"bbox_2d": [b.x1, b.y1, b.x2, b.y2], "label": b.label or None} for b in prediction.boxes],
        "masks": [_mask_summary(mask) for mask in prediction.volume_masks],
        "notes": list(prediction.notes),
        "files": files,
    }


def _mask_summary(mask: VolumeMask) -> dict[str, Any]:
    """One mask: whether SAM 2 found the target, how, on which frames, and its measures."""
    numbers = mask.source_frames
    return {
        **mask.measures().to_json(),
        "present": mask.present,
        "mode": mask.mode,
        "key_frame": numbers[mask.key_frame],
        "object_score": round(mask.score, 4),
        "object_scores": [round(float(s), 4) for s in mask.object_scores],  # one per segmented frame
    }
