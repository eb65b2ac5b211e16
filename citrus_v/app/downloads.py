"""The mask files offered for download after an answer: PNG always, and the format of the scan: NIfTI (on the
volume's own grid) for NIfTI input, DICOM Segmentation for DICOM input, written by
:mod:`citrus_v.infer.mask_files` (the writers ``citrus-v infer`` uses).

A format that cannot be written is named in one line with the reason; the other files still come.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..infer.results import MaskResult
from .scan import Scan, View


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
    if scan.kind == "dicom":
        seg_path = out_dir / f"{stem}_seg.dcm"
        writers.append(
            ("DICOM-SEG", lambda: write_dicom_seg(scan.path, arrays, labels, seg_path, frame=view.index))
        )
    for name, write in writers:
        try:
            written = write()
        except Exception as err:  # each writer's library (Pillow, nibabel, highdicom) raises its own types
            result.problems.append(f"{name} masks not written: {err}")
            continue
        result.files.extend([written] if isinstance(written, Path) else list(written))
    return result
