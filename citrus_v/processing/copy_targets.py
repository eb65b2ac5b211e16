"""Copy-attention targets: for each answer character read off the image, the image token that shows it.

A small language model given image tokens that each encode one printed character (the text-map loss,
:mod:`citrus_v.modeling.text_map`) still does not learn, from the answer's cross-entropy alone, to find a
line and copy it: answer positions cannot address image positions, only image content. The training-only
copy-attention loss (:mod:`citrus_v.modeling.copy_attention`) tells one attention head where to look.
Its targets come from the text map and the answer, with nothing else in the row:

1. the map is read one character per merged image token (its first patch's class), one line per token
   row — a page printed one character per token cell, as the synthetic lab reports are, reads exactly;
2. the answer is matched left to right against those lines: the longest run of at least ``min_run``
   characters found exactly once on the page is taken, anything ambiguous or absent is skipped;
3. each single-character answer token inside a run gets, at the position that predicts it, the distance
   back to its image token (``offsets[p] = p - key``; 0 = no target). Distances survive padding and packing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..modeling.text_map import class_char

IGNORE_LABEL = -100


def read_lines(text_targets: torch.Tensor, rows: int, cols: int) -> list[str]:
    """The page as text: one character per merged token (its first patch's class; space for none)."""
    first = text_targets[: rows * cols, 0].tolist()
    return ["".join(class_char(int(c)) or " " for c in first[r * cols : (r + 1) * cols]) for r in range(rows)]


def _find_runs(answer: str, lines: Sequence[str], min_run: int) -> dict[int, tuple[int, int]]:
    """Answer character index -> (line, column) for the characters inside uniquely found runs."""
    page = "\n".join(lines)  # a run never spans two lines
    width = len(lines[0]) + 1 if lines else 1
    where: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(answer):
        # the longest piece from i that is on the page (every prefix of a found piece is found too)
        j = i
        while j < len(answer) and answer[i : j + 1] in page:
            j += 1
        start = page.find(answer[i:j]) if j - i >= min_run else -1
        if start < 0 or page.find(answer[i:j], start + 1) >= 0:
            i += 1  # too short, or printed more than once: which one is meant is unknown
            continue
        for k in range(i, j):
            if not answer[k].isspace():
                where[k] = divmod(start + k - i, width)
        i = j
    return where


def copy_offsets(
    input_ids: Sequence[int],
    labels: Sequence[int],
    image_positions: Sequence[int],
    lines: Sequence[str],
    decode: Callable[[int], str],
    min_run: int = 3,
) -> list[int]:
    """Per position of ``input_ids``, the distance back to the image token its next token copies (0: none).

    Args:
        input_ids, labels: one encoded sample (labels ``-100`` outside answers).
        image_positions: positions of the first image's merged tokens in ``input_ids``, row-major.
        lines: that image read as text (:func:`read_lines`), ``len(image_positions) / len(lines)`` per line.
        decode: token id -> its text.
        min_run: shortest answer piece that is matched against the page.
    """
    offsets = [0] * len(input_ids)
    if not lines or not image_positions:
        return offsets
    cols = len(image_positions) // len(lines)
    position = 0
    while position < len(labels):
        if labels[position] == IGNORE_LABEL:
            position += 1
            continue
        span = []
        while position < len(labels) and labels[position] != IGNORE_LABEL:
            span.append(position)
            position += 1
        pieces = [decode(int(input_ids[p])) for p in span]
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        where = _find_runs("".join(pieces), lines, min_run)
        for p, piece, start in zip(span, pieces, starts, strict=False):
            if len(piece) == 1 and start in where and p > 0:
                row, column = where[start]
                key = image_positions[row * cols + column]
                if key < p - 1:
                    offsets[p - 1] = p - 1 - key
    return offsets
