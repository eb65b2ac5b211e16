"""``citrus-v infer``: answer one question about one image; write the overlay and the masks.

Outputs in ``--out``: ``overlay.png`` (masks and boxes drawn, with a legend), ``prediction.json`` (text,
boxes, mask scores and files), and the masks in the input's own format: ``mask_K.png`` for 2-D images,
``mask_K.nii.gz`` (the source volume's grid and affine, the mask in the chosen slice) for NIfTI, and one
DICOM Segmentation ``masks.seg.dcm`` (a segment per mask, referencing the source) for DICOM.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    if not prediction.masks:
        return [], []
    files = []
    for item in prediction.masks:
        path = out / f"mask_{item.index}.png"
        Image.fromarray(item.mask.astype(np.uint8) * 255).save(path)
        files.append(path)
    writers = {"nifti": ("NIfTI", _write_nifti), "dicom": ("DICOM-SEG", _write_dicom_seg)}
    if source.kind not in writers:
        return files, []
    name, writer = writers[source.kind]
    try:
        files += writer(source, prediction, out)
    except ImportError:
        raise  # a missing extra: the caller says which one to install
    except Exception as err:  # highdicom and nibabel raise many types for a source they cannot follow
        return files, [f"{name} not written ({type(err).__name__}: {err}); the PNG masks stand"]
    return files, []


# Type 2 attributes of the patient and study modules that a Segmentation copies from its source: a source that
# lacks them gets them empty (DICOM's "unknown") on the copy read for writing, never in the file itself
_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def _write_nifti(source: Source, prediction: Prediction, out: Path) -> list[Path]:
    import nibabel as nib

    volume = source.extra["volume"]
    files = []
    for item in prediction.masks:
        image = volume.mask_image({source.slice: item.mask.astype(np.uint8)}, source.axis)
        path = out / f"mask_{item.index}.nii.gz"
        nib.save(image, path)
        files.append(path)
    return files


def _write_dicom_seg(source: Source, prediction: Prediction, out: Path) -> list[Path]:
    """``out/masks.seg.dcm``: one DICOM Segmentation (highdicom) holding a binary segment per mask, referencing
    the source."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from .. import __version__

    dataset = pydicom.dcmread(source.path)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    masks = np.stack([m.mask for m in prediction.masks], axis=-1)  # [rows, cols, K]
    pixel_array = np.zeros((frames, *masks.shape), dtype=bool)
    pixel_array[source.frame or 0] = masks
    algorithm = hd.AlgorithmIdentificationSequence(
        name="Citrus-V", version=__version__, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=(item.label or f"mask {k + 1}")[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, item in enumerate(prediction.masks)
    ]
    segmentation = hd.seg.Segmentation(
        source_images=[dataset],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(dataset.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Citrus-V",
        manufacturer_model_name="citrus-v",
        software_versions=__version__,
        device_serial_number="0",
        content_description="Citrus-V [SEG] masks",
        omit_empty_frames=False,
    )
    path = out / "masks.seg.dcm"
    segmentation.save_as(path)
    return [path]


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
    from .overlay import draw_overlay

    prompt = query if IMAGE_PLACEHOLDER in query else IMAGE_PLACEHOLDER + query
    prediction = predictor.predict(source.image, prompt, system=system, **generation)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "prediction.json"
    # the answer first: nothing written after it can lose it
    result = summary(prediction, source, {"overlay": None, "masks": []})
    record.write_text(json.dumps(result, indent=2) + "\n")
    overlay_path = out / "overlay.png"
    draw_overlay(source.image, prediction.masks, prediction.boxes).save(overlay_path)
    masks, problems = write_masks(source, prediction, out)
    result = summary(prediction, source, {"overlay": str(overlay_path), "masks": [str(p) for p in masks]})
    result["not_written"] = problems
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_parser(sub) -> None:
    """Register ``infer``."""
    parser = sub.add_parser("infer", help="answer one question about one image; write the overlay and masks")
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--image", required=True, help="PNG/JPEG, DICOM (.dcm) or NIfTI (.nii/.nii.gz)")
    parser.add_argument("--query", required=True, help="the question, e.g. 'Please segment the lesion.'")
    parser.add_argument("--out", default="infer_out", help="output folder (default: infer_out)")
    parser.add_argument("--slice", type=int, default=None, help="NIfTI: slice index (default: the middle one)")
    parser.add_argument("--axis", type=int, default=2, choices=[0, 1, 2], help="NIfTI: slice axis in RAS+ (2: axial)")
    parser.add_argument("--frame", type=int, default=None, help="multi-frame DICOM: frame index (default: 0)")
    parser.add_argument(
        "--window",
        default=None,
        help="CT window: a preset (ct-abdomen, ct-lung, ct-bone, ct-brain, ct-liver), "
        "'C,W', or 'file' (default: the file's own window, else full range)",
    )
    parser.add_argument("--system", default=None, help="system prompt (default: the processor's)")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``citrus-v infer``."""
    import torch

    from ..checkpoint_layout import CheckpointError
    from ..media import MedicalImageError
    from .predictor import CitrusVPredictor

    try:
        source = load_source(args.image, args.slice, args.axis, args.frame, args.window)
    except (MedicalImageError, FileNotFoundError) as err:
        print(f"citrus-v infer: {err}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        predictor = CitrusVPredictor.from_pretrained(args.model, device=device)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"citrus-v infer: cannot load {args.model}: {err}", file=sys.stderr)
        return 1
    try:
        result = infer_file(
            predictor,
            source,
            args.query,
            Path(args.out),
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    except ImportError as err:  # DICOM-SEG and RLE outputs come with the `serve` extra
        print(f"citrus-v infer: {err.name} is needed for this output: pip install 'citrus-v[serve]'", file=sys.stderr)
        return 1
    print(result["answer"])
    for problem in result["not_written"]:
        print(f"citrus-v infer: {problem}", file=sys.stderr)
    files = [result["files"]["overlay"], *result["files"]["masks"]]
    print(
        f"{len(result['masks'])} mask(s), {len(result['boxes'])} box(es); wrote {', '.join(files)} and "
        f"{Path(args.out) / 'prediction.json'}",
        file=sys.stderr,
    )
    return 0
