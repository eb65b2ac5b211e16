"""References: how a dataset row, a request or a command line names an image or a mask.

A reference is a path string, optionally with a fragment (``scan.nii.gz#slice=40&axis=2``,
``cine.dcm#frame=3&window=ct-lung``, ``labels.nii.gz#slice=40&label=2,10``), or a dict with the same keys plus
``path`` (``{"path": "scan.dcm", "window": "40,400"}``). The file name says the format: DICOM, NIfTI, or a
raster image that Pillow reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from .errors import MedicalImageError, is_regular_file, path_error

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
_REF_KEYS = {"path", "frame", "axis", "slice", "t", "window", "label"}


@dataclass
class MediaRef:
    """A parsed image or mask reference (see the module docstring)."""

    path: Path
    frame: int | None = None
    axis: int | None = None
    slice: int | None = None
    t: int | None = None
    window: str | None = None
    label: tuple[int, ...] | None = None  # mask values counted as foreground (default: any non-zero)

    @property
    def kind(self) -> str:
        """``dicom``, ``nifti`` or ``raster`` (anything Pillow reads), by file name; a name without a suffix is
        DICOM when the file has the DICOM preamble. A path the system cannot look up is a
        :class:`MedicalImageError` (``unreadable_image``) naming it."""
        name = self.path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            return "nifti"
        if name.endswith(DICOM_SUFFIXES):
            return "dicom"
        if self.path.suffix == "" and is_regular_file(self.path) and _has_dicom_preamble(self.path):
            return "dicom"
        return "raster"


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except (OSError, ValueError) as err:  # no permission, or the file went away
        raise path_error(path, err) from err
    return len(head) == 132 and head[128:] == b"DICM"


def parse_ref(ref: str | Path | Mapping[str, Any], base_dir: str | Path | None = None) -> MediaRef:
    """Parse a reference (path string with optional ``#key=value&...`` fragment, or a dict with ``path``).

    Relative paths are resolved against ``base_dir`` (the JSONL file's folder).
    """
    path_text, options = _split_ref(ref)
    try:
        path = Path(path_text).expanduser()
    except RuntimeError as err:  # '~user' for a user this machine does not know
        raise MedicalImageError(f"reference {ref!r}: {err}. Fix: give the full path", "bad_reference") from err
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    parsed = MediaRef(path=path, window=None if options.get("window") is None else str(options["window"]))
    label = options.get("label")
    if label is not None:
        values = label if isinstance(label, (list, tuple)) else str(label).split(",")
        try:
            parsed.label = tuple(int(v) for v in values)
        except (TypeError, ValueError) as err:
            raise MedicalImageError(
                f"reference {ref!r}: label={label!r} must be an integer or a comma-separated list of integers",
                "bad_reference",
            ) from err
    for key in ("frame", "axis", "slice", "t"):
        if options.get(key) is not None:
            try:
                setattr(parsed, key, int(options[key]))
            except (TypeError, ValueError) as err:
                raise MedicalImageError(
                    f"reference {ref!r}: {key}={options[key]!r} is not an integer", "bad_reference"
                ) from err
    if parsed.axis is not None and parsed.axis not in (0, 1, 2):
        raise MedicalImageError(f"reference {ref!r}: axis must be 0, 1 or 2", "bad_reference")
    return parsed


def _split_ref(ref: str | Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The path text and the options (still strings for a fragment) of a reference."""
    if isinstance(ref, Mapping):
        unknown = set(ref) - _REF_KEYS
        if "path" not in ref or unknown:
            raise MedicalImageError(
                f"reference {dict(ref)!r}: a dict reference needs 'path' and may have {sorted(_REF_KEYS - {'path'})}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else ""),
                "bad_reference",
            )
        return str(ref["path"]), {k: v for k, v in ref.items() if k != "path"}
    path_text = str(ref)
    if "#" in path_text:
        head, _, fragment = path_text.rpartition("#")
        pairs = parse_qsl(fragment, keep_blank_values=True)
        # a '#' that is part of a real file name stays in the path
        if pairs and all(key in _REF_KEYS - {"path"} for key, _ in pairs):
            return head, dict(pairs)
    return path_text, {}
