"""The mask files offered for download after an answer: PNG always, and the format of the scan: NIfTI (on the
volume's own grid) for NIfTI input, DICOM Segmentation for DICOM input, written by
:mod:`citrus_v.infer.mask_files` (the writers ``citrus-v infer`` uses).

A whole-volume answer gets the 3-D files ``citrus-v infer`` writes for a volume
(:mod:`citrus_v.infer.volume_masks`): one NIfTI per target on the source's grid (an absent target's is empty),
one DICOM Segmentation of the targets present for a DICOM series or multi-frame file, and the three-plane (or
frame-strip) picture.

A format that cannot be written is named in one line with the reason; the other files still come.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..infer.results import MaskResult
from ..media import Volume
from .scan import Scan, View
from .volume_answer import VolumeAnswer


@dataclass
class Downloads:
    """The files written for one answer, and a line per format that could not be written."""

    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class DownloadFolder:
    """A temporary folder for one page's mask files, removed when the page object goes away.

    Each answer gets its own sub-folder, so that a download never mixes two answers' files.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="citrus-v-app-masks-", dir=parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def new_answer_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="answer-", dir=self.root))


def write_downloads(scan: Scan, view: View, masks: Sequence[MaskResult], out_dir: Path) -> Downloads:
    """Write ``masks`` (in the pixels of ``view``) as PNG, and as NIfTI or DICOM-SEG to match ``scan``."""
    from ..infer.mask_files import write_dicom_seg, write_nifti_masks, write_png_masks

    result = Downloads()
    if not masks:
        return result
    arrays = [m.mask.astype(bool) for m in masks]
    labels = [m.label or "mask" for m in masks]
    stem = scan.path.name.split(".")[0] or "mask"
    writers: list[tuple[str, Callable[[], Path | list[Path]]]] = [
        ("PNG", lambda: write_png_masks(arrays, out_dir, stem=stem))
    ]
    if scan.kind == "nifti":
        writers.append(
            ("NIfTI", lambda: write_nifti_masks(scan.path, arrays, view.index, view.axis, out_dir))
        )
    if scan.kind == "dicom" and not view.whole:
        seg_path = out_dir / f"{stem}_seg.dcm"
        writers.append(
            ("DICOM-SEG", lambda: write_dicom_seg(scan.path, arrays, labels, seg_path, frame=view.index))
        )
    return _run(writers, result)


def write_volume_downloads(
    scan: Scan, volume: Volume, answer: VolumeAnswer, picture: Image.Image | None, out_dir: Path
) -> Downloads:
    """Write a whole-volume answer's 3-D masks (over ``volume``, the stack the server read) and ``picture``."""
    from ..infer.volume_masks import write_volume_nifti, write_volume_seg

    result = Downloads()
    if not answer.targets:
        return result
    out_dir = Path(out_dir)
    stem = scan.path.name.split(".")[0] or "mask"
    stacks = answer.stacks()
    present = [k for k, t in enumerate(answer.targets) if t.present]
    writers: list[tuple[str, Callable[[], Path | list[Path]]]] = [
        ("NIfTI", lambda: write_volume_nifti(volume, stacks, out_dir, stem=f"{stem}_mask"))
    ]
    if scan.kind in ("series", "dicom") and present:
        labels = [answer.targets[k].label or "mask" for k in present]
        seg_path = out_dir / f"{stem}.seg.dcm"
        writers.append(("DICOM-SEG", lambda: write_volume_seg(volume, [stacks[k] for k in present], labels, seg_path)))
    elif scan.kind in ("series", "dicom"):
        result.problems.append("DICOM-SEG not written: no target is present in this volume")
    if picture is not None:
        writers.append(("Three-plane PNG", lambda: _save_picture(picture, out_dir / f"{stem}_planes.png")))
    return _run(writers, result)


def _save_picture(picture: Image.Image, path: Path) -> Path:
    picture.save(path)
    return path


def _run(writers: list[tuple[str, Callable[[], Path | list[Path]]]], result: Downloads) -> Downloads:
    """Run each writer; one that fails adds a line naming its format and the reason, the others still write."""
    for name, write in writers:
        try:
            written = write()
        except Exception as err:  # each writer's library (Pillow, nibabel, highdicom) raises its own types
            result.problems.append(f"{name} masks not written: {err}")
            continue
        result.files.extend([written] if isinstance(written, Path) else list(written))
    return result
