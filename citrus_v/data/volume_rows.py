"""Volume and clip rows of the synthetic corpus: CT/MR volumes and ultrasound cine loops asked about through
ms-swift's ``"videos"`` field, with one 3-D mask per ``[SEG]``.

Files, per case (``images/{split}/`` and ``masks/{split}/``):

* a **volume** ``vol_NNNNN.nii.gz``: 24-48 axial slices of 128-224 pixels (``CorpusOptions.volume_slices`` and
  ``volume_size``), CT in Hounsfield units or MR signal as int16, stored L-P-S with an affine to RAS+ mm;
  in-plane spacing from a body-sized field of view (340-400 mm across the abdomen, 320-380 mm across the chest,
  so 1.5-3.1 mm per pixel), 2.0, 2.5 or 3.0 mm between slices. Its **label volume**
  ``vol_NNNNN_labels.nii.gz`` is on the same grid and affine: 0 background, organ ``k`` of
  :data:`~citrus_v.data.phantoms.ORGANS` ``[region]`` is ``k + 1``, lesion ``j`` is ``10 + j``;
* a **clip** ``clip_NNNNN.dcm``: a multi-frame ultrasound DICOM (Ultrasound Multi-frame Image Storage, 8-bit,
  Frame Time and Cine Rate set) of 16-32 frames of a beating heart; its masks are a **label stack**
  ``clip_NNNNN_labels.nii.gz``, a NIfTI with one slice per frame (slice ``k`` read as a display slice is the
  mask of frame ``k``, pixel for pixel; values of :data:`~citrus_v.data.phantoms.CINE_STRUCTURES`).

A mask reference names the label file and the values of its target: ``masks/train/vol_00003_labels.nii.gz
#label=1,10`` (the liver with the lesion inside it). It is read with
:func:`~citrus_v.media.volumes.read_volume` (``[frames, H, W]``, in the order of the video's frames) and
``np.isin(values, label)``.

Rows (``task``; every row has ``meta.kind`` ``volume`` or ``clip`` and ``meta.shape`` ``[frames, H, W]``):

* ``segmentation-3d``: "<video>Segment the liver." -> "Sure, here is the liver [SEG]." with one 3-D mask;
  "Segment every lesion." -> one ``[SEG]`` per lesion ("There are 2 lesions, from left to right: lesion 1
  [SEG], lesion 2 [SEG]."), ordered left to right by the lesion's centre column as shown, then top to bottom,
  then from the lowest slice up (asked of volumes with one lesion or none too, so that "every" does not give
  the count away); ``meta.target`` names what was asked for ("liver", "lesion", "every lesion"),
  ``meta.targets`` each mask in order and ``meta.slices`` the first and last frame each covers;
* ``vqa-closed-3d``: "Is there a lesion in the liver? Answer yes or no." and "How many lesions are there in this
  volume?";
* absent targets (:mod:`~citrus_v.data.absent_rows`), task ``segmentation-3d`` without ``[SEG]`` or masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..media import from_display
from ..tokens import VIDEO_PLACEHOLDER
from .absent_rows import AbsentBalance, AbsentQuestion, AbsentScene, absent_meta, absent_rows
from .phantoms import CINE_STRUCTURES, ORGANS, Cine, make_cine, make_volume_anatomy
from .synthetic_dicom import synthetic_dataset

if TYPE_CHECKING:
    from .corpus import CorpusOptions

# random streams: [seed, stream, index] for each kind of case, [..., ABSENT_STREAM] for its absent rows
VOLUME_STREAM = 1_000_003
CLIP_STREAM = 1_000_033
ABSENT_STREAM = 2_000_003
# [seed, index, PHRASING_STREAM]: a scan's choice between "the lesion" and "every lesion" when it has one or none
PHRASING_STREAM = 2_000_029
VOLUME_KINDS = (("CT", "abdomen"), ("CT", "chest"), ("MR", "abdomen"))
VOLUME_WINDOWS = {("CT", "abdomen"): "ct-abdomen", ("CT", "chest"): "ct-lung"}
FIELD_OF_VIEW_MM = {"abdomen": (340.0, 400.0), "chest": (320.0, 380.0)}
SLICE_MM = (2.0, 2.5, 3.0)
LESION_LABEL = 10  # label value of the first lesion
MIN_ORGAN_VOXELS = 200  # an organ with fewer voxels in the volume is not asked about
MIN_LESION_VOXELS = 20
SEGMENT_QUESTIONS = ("Segment the {target}.", "Please segment the {target} in this {medium}.",
                     "Segment the {target} on every {frame}.")
ULTRASOUND_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
UID_ROOT = "citrus-v-synth"


def write_volume(path: Path, slices: list[np.ndarray], spacing: tuple[float, float, float], dtype) -> None:
    """Write display-orientation slices as a NIfTI volume stored L-P-S (the affine maps it to RAS+ world)."""
    import nibabel as nib

    canonical = np.stack([from_display(s, 2) for s in slices], axis=-1)  # RAS+ voxel order
    stored = canonical[::-1, ::-1, :]  # LPS on disk, as DICOM-derived volumes usually are
    sx, sy, sz = spacing
    nx, ny, _ = stored.shape
    affine = np.array(
        [[-sx, 0, 0, sx * (nx - 1)], [0, -sy, 0, sy * (ny - 1)], [0, 0, sz, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    image = nib.Nifti1Image(stored.astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def write_cine_dicom(path: Path, cine: Cine, uid_seed: str) -> None:
    """A cine loop as one multi-frame ultrasound DICOM file (8-bit grey, Frame Time in ms, Cine Rate)."""
    from pydicom.tag import Tag

    ds = synthetic_dataset(ULTRASOUND_SOP_CLASS, uid_seed, "US", "HEART")
    frames, rows, cols = cine.frames.shape
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, cols
    ds.FrameTime = f"{1000.0 / cine.fps:.3f}"
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # Frame Time
    ds.CineRate = int(round(cine.fps))
    ds.HeartRate = int(round(cine.heart_rate))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(cine.frames, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@dataclass
class _CaseFiles:
    """Where one volume or clip case writes its files, and the references rows give them."""

    out: Path
    split: str
    case: str

    def image(self, suffix: str) -> Path:
        folder = self.out / "images" / self.split
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.case}{suffix}"

    def mask(self, suffix: str) -> Path:
        folder = self.out / "masks" / self.split
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{self.case}{suffix}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()


@dataclass
class _Stack:
    """What a case's rows are made from: the video and label references, the label stack and the row meta."""

    video: str
    labels_ref: str
    labels: np.ndarray  # [frames, H, W] label values
    meta: dict[str, Any]
    medium: str  # "volume" or "clip"

    def row(self, task: str, question: str, answer: str, masks: list[str] | None = None,
            meta_update: dict[str, Any] | None = None) -> dict[str, Any]:
        """One row about the whole stack."""
        row: dict[str, Any] = {
            "task": task,
            "messages": [{"role": "user", "content": VIDEO_PLACEHOLDER + question},
                         {"role": "assistant", "content": answer}],
            "videos": [self.video],
        }
        if masks:
            row["masks"] = masks
        row["meta"] = dict(self.meta, **meta_update) if meta_update else self.meta
        return row

    def mask_ref(self, values: Sequence[int]) -> str:
        return f"{self.labels_ref}#label={','.join(str(v) for v in values)}"

    def segment(self, rng: np.random.Generator, target: str, values: Sequence[int]) -> dict[str, Any]:
        """A segmentation row for one target whose mask is the label ``values``."""
        frame = "slice" if self.medium == "volume" else "frame"
        question = SEGMENT_QUESTIONS[int(rng.integers(0, len(SEGMENT_QUESTIONS)))]
        return self.row(
            "segmentation-3d", question.format(target=target, medium=self.medium, frame=frame),
            f"Sure, here is the {target} [SEG].", [self.mask_ref(values)],
            {"target": target, "targets": [target], "slices": [frame_range(np.isin(self.labels, values))]},
        )


def frame_range(mask: np.ndarray) -> list[int]:
    """``[first, last]`` frame of a ``[frames, H, W]`` mask that holds any voxel."""
    frames = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return [int(frames[0]), int(frames[-1])]


def _draw_size(rng: np.random.Generator, bounds: tuple[int, int], multiple: int = 8) -> int:
    low, high = bounds
    value = int(rng.integers(low, high + 1))
    return int(min(max(round(value / multiple) * multiple, low), high))


# --- volumes ---------------------------------------------------------------------------------------------------
def volume_case(
    out: Path, split: str, case: str, options: CorpusOptions, seed: list[int], balance: AbsentBalance
) -> list[dict[str, Any]]:
    """Write one CT/MR volume and its label volume; return its rows."""
    rng = np.random.default_rng(seed)
    modality, region = VOLUME_KINDS[int(rng.integers(0, len(VOLUME_KINDS)))]
    depth, size = _draw_size(rng, options.volume_slices, 1), _draw_size(rng, options.volume_size)
    spacing = round(float(rng.uniform(*FIELD_OF_VIEW_MM[region])) / size, 3)
    slice_mm = float(SLICE_MM[int(rng.integers(0, len(SLICE_MM)))])
    anatomy = make_volume_anatomy(rng, modality, region, size, depth, spacing, slice_mm)
    views = [anatomy.render(rng, z) for z in range(depth)]
    labels = np.zeros((depth, size, size), dtype=np.uint8)
    for z, view in enumerate(views):
        for index, name in enumerate(ORGANS[region]):
            labels[z][view.organs[name]] = index + 1
        for index, mask in enumerate(view.lesions):
            labels[z][mask] = LESION_LABEL + index
    files = _CaseFiles(out, split, case)
    volume, label_path = files.image(".nii.gz"), files.mask("_labels.nii.gz")
    write_volume(volume, [np.rint(v.values) for v in views], (spacing, spacing, slice_mm), np.int16)
    write_volume(label_path, list(labels), (spacing, spacing, slice_mm), np.uint8)
    window = VOLUME_WINDOWS.get((modality, region))
    meta = {"case": case, "kind": "volume", "modality": modality, "region": region, "format": "nifti",
            "spacing_mm": [slice_mm, spacing, spacing], "shape": [depth, size, size]}
    stack = _Stack(files.rel(volume) + (f"#window={window}" if window else ""), files.rel(label_path), labels, meta,
                   "volume")
    hosts = [lesion.host for lesion in anatomy.lesions]
    lesions = visible_lesions(labels, len(hosts))
    rows = _volume_rows(stack, rng, region, hosts, lesions)
    scene = AbsentScene(modality, region, "volume", has_lesion=bool(lesions))
    return rows + _absent_top_up(stack, scene, rows, split, seed, balance)


def visible_lesions(labels: np.ndarray, count: int) -> list[int]:
    """Label values of the lesions with at least :data:`MIN_LESION_VOXELS` voxels, in reading order: left to
    right by centre column as shown, then top to bottom, then from the lowest slice up."""
    found = [LESION_LABEL + j for j in range(count) if (labels == LESION_LABEL + j).sum() >= MIN_LESION_VOXELS]
    return sorted(found, key=lambda value: _reading_order(labels == value))


def _volume_rows(
    stack: _Stack, rng: np.random.Generator, region: str, hosts: list[str], lesions: list[int]
) -> list[dict[str, Any]]:
    """Segmentation of two organs and of the lesion(s) (or the lesion-free answer), then a presence and a count
    question; ``lesions`` are the visible lesions' label values in reading order."""
    labels = stack.labels
    organ_values = {
        name: [index + 1] + [LESION_LABEL + j for j, host in enumerate(hosts) if host == name]
        for index, name in enumerate(ORGANS[region])
    }
    organs = [name for name, values in organ_values.items() if np.isin(labels, values).sum() >= MIN_ORGAN_VOXELS]
    rows = [stack.segment(rng, name, organ_values[name])
            for name in sorted(rng.choice(organs, size=min(2, len(organs)), replace=False), key=organs.index)]
    rows.append(_lesion_row(stack, rng, lesions))
    found = [hosts[value - LESION_LABEL] for value in lesions]
    shown = organs or list(ORGANS[region])  # a volume too small for any organ's minimum still gets a question
    organ = found[int(rng.integers(0, len(found)))] if found and rng.uniform() < 0.5 else \
        shown[int(rng.integers(0, len(shown)))]
    rows.append(stack.row("vqa-closed-3d", f"Is there a lesion in the {organ}? Answer yes or no.",
                          "yes" if organ in found else "no", meta_update={"organ": organ}))
    rows.append(stack.row("vqa-closed-3d", "How many lesions are there in this volume?", str(len(lesions))))
    return rows


def asks_every_lesion(count: int, rng: np.random.Generator) -> bool:
    """Whether a scan or volume with ``count`` lesions is asked for "every lesion" (else "the lesion"): always
    with several, half the time (a draw from ``rng``) with one or none, so that "every" does not tell how many
    there are."""
    return count > 1 or rng.uniform() < 0.5


def every_lesion_answer(count: int) -> str:
    """The answer to "Segment every lesion." with ``count`` (at least one) lesions: one ``[SEG]`` each, in
    reading order."""
    parts = ", ".join(f"lesion {k + 1} [SEG]" for k in range(count))
    return f"There is 1 lesion: {parts}." if count == 1 else f"There are {count} lesions, from left to right: {parts}."


def _lesion_row(stack: _Stack, rng: np.random.Generator, lesions: list[int]) -> dict[str, Any]:
    """"The lesion" or "every lesion" (:func:`asks_every_lesion`): one ``[SEG]`` per lesion in reading order, or
    the lesion-free answer."""
    every = asks_every_lesion(len(lesions), rng)
    question = "Segment every lesion." if every else "Segment the lesion."
    if not lesions:
        return stack.row("segmentation-3d", question, "There is no lesion in this volume.",
                         meta_update=absent_meta("lesion", "lesion_free", "segmentation"))
    if not every:
        return stack.segment(rng, "lesion", lesions)
    return stack.row(
        "segmentation-3d", question, every_lesion_answer(len(lesions)), [stack.mask_ref([value]) for value in lesions],
        {"target": "every lesion", "targets": [f"lesion {k + 1}" for k in range(len(lesions))],
         "slices": [frame_range(stack.labels == value) for value in lesions]},
    )


def _reading_order(mask: np.ndarray) -> tuple[float, float, float]:
    """A lesion's place in "every lesion" answers: its centre column, then row, then slice."""
    frames, ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), float(frames.mean())


# --- clips -----------------------------------------------------------------------------------------------------
def clip_case(
    out: Path, split: str, case: str, options: CorpusOptions, seed: list[int], balance: AbsentBalance
) -> list[dict[str, Any]]:
    """Write one ultrasound cine loop (multi-frame DICOM) and its label stack; return its rows."""
    rng = np.random.default_rng(seed)
    cine = make_cine(rng, _draw_size(rng, options.clip_frames, 1), options.clip_size)
    files = _CaseFiles(out, split, case)
    clip, label_path = files.image(".dcm"), files.mask("_labels.nii.gz")
    write_cine_dicom(clip, cine, f"{UID_ROOT}-{options.seed}-{case}")
    write_volume(label_path, list(cine.labels), (1.0, 1.0, 1.0), np.uint8)  # a clip has no calibrated spacing
    meta = {"case": case, "kind": "clip", "modality": "US", "region": "heart", "format": "dicom",
            "fps": cine.fps, "shape": list(cine.frames.shape)}
    stack = _Stack(files.rel(clip), files.rel(label_path), cine.labels, meta, "clip")
    rows = [stack.segment(rng, name, [value]) for name, value in CINE_STRUCTURES.items()]
    scene = AbsentScene("US", "heart", "clip", has_lesion=False)
    return rows + _absent_top_up(stack, scene, rows, split, seed, balance)


def _absent_top_up(
    stack: _Stack, scene: AbsentScene, rows: list[dict[str, Any]], split: str, seed: list[int],
    balance: AbsentBalance,
) -> list[dict[str, Any]]:
    """The extra absent-target rows of one volume or clip, from the case's own absent stream."""
    count = balance.extra((split, "stack"), rows)

    def make(drawn: AbsentQuestion) -> dict[str, Any]:
        return stack.row("segmentation-3d", drawn.question, drawn.answer, meta_update=drawn.meta)

    asked = [r["messages"][0]["content"].removeprefix(VIDEO_PLACEHOLDER) for r in rows]
    return absent_rows(scene, count, np.random.default_rng(list(seed) + [ABSENT_STREAM]), make, asked)
