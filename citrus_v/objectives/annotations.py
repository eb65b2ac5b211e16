"""Row annotations that training-only objectives read: facts about a row's first image, named for what they are.

A training row may carry, next to ``images``, ``messages`` and ``masks``::

    {"lesion_mask": "lesions.png",        # every lesion pixel of images[0] (a mask: path, RLE, label pick)
     "lesion_points": [[x, y], ...],      # the centre of every lesion, images[0] pixels
     "char_map": "chars.png"}             # one-channel label image of images[0]'s size: character classes

Inference and evaluation ignore them; an objective lists the ones it reads in ``Objective.reads``. This
module checks them (schema, size, bounds) and loads them, so that validation and the dataset need no
knowledge of which objective uses what. Character classes: 0 for none, printable ASCII ``'!'..'~'`` as
1..94 (:func:`char_class`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..media import MedicalImageError, read_label_map, read_mask

MASK_ANNOTATIONS = ("lesion_mask",)  # masks of images[0]'s size
POINT_ANNOTATIONS = ("lesion_points",)  # (x, y) pixels of images[0]
LABEL_ANNOTATIONS = ("char_map",)  # one-channel label images of images[0]'s size
ANNOTATIONS = (*MASK_ANNOTATIONS, *POINT_ANNOTATIONS, *LABEL_ANNOTATIONS)

FIRST_CHAR, LAST_CHAR = 33, 126
CHAR_CLASSES = LAST_CHAR - FIRST_CHAR + 2  # class 0 = no character (a space is "no character")


class AnnotationError(ValueError):
    """An annotation that cannot be used; ``reason`` is the skip-count key, the message names the fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def char_class(char: str) -> int:
    """The class of one character: 1..94 for printable ASCII, 0 for a space or anything else."""
    code = ord(char)
    return code - FIRST_CHAR + 1 if FIRST_CHAR <= code <= LAST_CHAR else 0


def class_char(label: int) -> str:
    """The character of a class ("" for class 0)."""
    return chr(label - 1 + FIRST_CHAR) if 1 <= label < CHAR_CLASSES else ""


def present(row: dict[str, Any]) -> list[str]:
    """The annotations a row carries."""
    return [key for key in ANNOTATIONS if row.get(key) is not None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_schema(row: dict[str, Any]) -> None:
    """Raise :class:`AnnotationError` (reason ``schema``) for an annotation of the wrong JSON type."""
    for key in MASK_ANNOTATIONS:
        if row.get(key) is not None and not isinstance(row[key], (str, dict)):
            raise AnnotationError("schema", f"'{key}' must be a mask path string or an RLE object")
    for key in POINT_ANNOTATIONS:
        points = row.get(key)
        if points is not None and not (
            isinstance(points, list)
            and all(isinstance(p, list) and len(p) == 2 and all(map(_is_number, p)) for p in points)
        ):
            raise AnnotationError("schema", f"'{key}' must be a list of [x, y] pixel points")
    for key in LABEL_ANNOTATIONS:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise AnnotationError("schema", f"'{key}' must be the path of a label image (PNG)")


def check_against_image(row: dict[str, Any], size: tuple[int, int] | None) -> Iterator[tuple[str, Any]]:
    """Check a row's annotations against its first image's ``(width, height)`` (None: the row has none);
    yield ``(key, ref)`` of the image-like ones, whose size the caller checks as it checks masks."""
    for key in present(row):
        if size is None:
            raise AnnotationError("seg_without_image", f"{key} given but the row has no image")
    width, height = size if size is not None else (0, 0)
    for key in POINT_ANNOTATIONS:
        for k, (x, y) in enumerate(row.get(key) or []):
            if not (0 <= x < width and 0 <= y < height):
                raise AnnotationError(
                    "point_outside",
                    f"{key}[{k}] = [{x}, {y}] lies outside images[0] ({width}x{height}): give its pixels",
                )
    for key in (*MASK_ANNOTATIONS, *LABEL_ANNOTATIONS):
        if row.get(key) is not None:
            yield key, row[key]


def load(row: dict[str, Any], base_dir: str | Path | None, size: tuple[int, int]) -> dict[str, Any]:
    """Read a row's annotations for an image of ``(width, height)``: masks and label maps as arrays, points
    as float lists. Raises :class:`AnnotationError` naming the annotation and what failed."""
    loaded: dict[str, Any] = {}
    width, height = size
    for key in present(row):
        try:
            if key in MASK_ANNOTATIONS:
                value = read_mask(row[key], base_dir, size=size)
            elif key in LABEL_ANNOTATIONS:
                value = read_label_map(row[key], base_dir)
            else:
                value = [list(map(float, point)) for point in row[key]]
        except MedicalImageError as err:
            raise AnnotationError(err.reason, f"{key}: {err}") from err
        if isinstance(value, np.ndarray) and value.shape != (height, width):
            raise AnnotationError(
                "mask_size", f"{key} is {value.shape[1]}x{value.shape[0]} but images[0] is {width}x{height}"
            )
        loaded[key] = value
    return loaded


def check_map_size(key: str, array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` when it is ``size`` ``(width, height)``, else a ValueError naming the annotation."""
    if array.shape != (size[1], size[0]):
        raise ValueError(
            f"{key} is {array.shape[1]}x{array.shape[0]} but the first image is {size[0]}x{size[1]}: "
            "the map must have its image's size"
        )
    return array


def chars_per_patch(labels: np.ndarray, cells: tuple[int, int], merge: int) -> torch.Tensor:
    """``[rows * cols, merge * merge]`` in merged-token order: the character class at the centre of each patch
    (patches row-major within their merged token, as Qwen2.5-VL's merger reads them). ``labels`` is the
    ``[H, W]`` char map of the original picture; ``cells`` the merged-token grid ``(rows, cols)``."""
    rows, cols = cells
    height, width = labels.shape
    ys = ((np.arange(rows * merge) + 0.5) * height / (rows * merge)).astype(int)
    xs = ((np.arange(cols * merge) + 0.5) * width / (cols * merge)).astype(int)
    grid = labels[ys][:, xs].astype(np.int64)  # [rows*merge, cols*merge]
    blocks = grid.reshape(rows, merge, cols, merge).transpose(0, 2, 1, 3).reshape(rows * cols, merge * merge)
    return torch.from_numpy(np.ascontiguousarray(blocks))
