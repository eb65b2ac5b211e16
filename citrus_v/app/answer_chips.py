"""The answer as the page shows it: each ``[SEG]`` replaced by a chip in its mask's colour and number, and a line
when the masks do not match the answer (counts differ, a segmentation request without a mask, an empty mask).
In a whole-volume answer a target the server found on no frame gets a grey "not present" chip.

Chip colours come from :func:`citrus_v.infer.overlay.colour` by the mask's position, the same colour the overlay
and the legend give that mask.
"""

from __future__ import annotations

import html
import re
from collections.abc import Collection, Sequence
from typing import Protocol

from ..infer.overlay import colour
from ..infer.results import MaskResult
from ..tokens import SEG_TOKEN

_ANSWER_OPEN = re.compile(r"<answer>", re.S)
_ANSWER_PART = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_THINK_PART = re.compile(r"<think>.*?(?:</think>|$)", re.S)
MISSING_CHIP_COLOUR = (128, 128, 128)


class Target(Protocol):
    """What a chip needs of a mask: which ``[SEG]`` it answers and its label (a 2-D mask or a volume target)."""

    index: int
    label: str | None


def text_colour(fill: tuple[int, int, int]) -> str:
    """Black or white, whichever reads better on ``fill`` (the rule the overlay's number tags use)."""
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return "#000000" if luminance > 140 else "#ffffff"


def chip_html(number: int, fill: tuple[int, int, int], title: str, missing: bool = False, text: str = "") -> str:
    """One chip: the mask's number on its colour (``data-mask`` holds the number, 0 when no mask came back);
    ``text`` replaces the number (a grey "not present" chip keeps its number in ``data-mask``)."""
    r, g, b = fill
    text = text or ("no mask" if missing else str(number))
    return (
        f'<span class="seg-chip{" seg-chip-missing" if missing else ""}" data-mask="{0 if missing else number}" '
        f'title="{html.escape(title)}" style="background-color: rgb({r}, {g}, {b}); color: {text_colour(fill)}; '
        'border-radius: 0.6em; padding: 0 0.45em; font-weight: 600; white-space: nowrap">'
        f"{html.escape(text)}</span>"
    )


def answer_part(content: str) -> tuple[str, int]:
    """The part of the answer shown (``<answer>…`` when present, else the text without ``<think>…``) and how many
    ``[SEG]`` tokens come before it (the server numbers masks over the whole text)."""
    opening = _ANSWER_OPEN.search(content)
    if opening is not None:
        match = _ANSWER_PART.search(content)
        shown = match.group(1) if match else ""
        return shown.strip(), content[: opening.start()].count(SEG_TOKEN)
    think = _THINK_PART.search(content)
    if think is None:
        return content.strip(), 0
    return (content[: think.start()] + content[think.end() :]).strip(), content[: think.end()].count(SEG_TOKEN)


def answer_html(content: str, masks: Sequence[Target], absent: Collection[int] = ()) -> str:
    """The shown answer as HTML, every ``[SEG]`` a chip; ``masks`` in overlay order (sorted by ``index``);
    ``absent``: positions of targets found nowhere in the volume (grey chips)."""
    shown, offset = answer_part(content)
    position_of = {m.index: k for k, m in enumerate(masks)}
    pieces = shown.split(SEG_TOKEN)
    parts = [html.escape(pieces[0])]
    for j, after in enumerate(pieces[1:]):
        position = position_of.get(offset + j)
        if position is None:
            parts.append(chip_html(0, MISSING_CHIP_COLOUR, "the server returned no mask for this [SEG]", True))
        elif position in absent:
            label = masks[position].label or "mask"
            title = f"mask {position + 1}: {label}, not present in this volume"
            parts.append(chip_html(position + 1, MISSING_CHIP_COLOUR, title, text=f"{position + 1} not present"))
        else:
            label = masks[position].label or "mask"
            parts.append(chip_html(position + 1, colour(position), f"mask {position + 1}: {label}"))
        parts.append(html.escape(after))
    return f'<div class="answer-text" style="white-space: pre-wrap">{"".join(parts)}</div>'


def answer_notes(
    content: str, masks: Sequence[MaskResult] | Sequence[Target], expects_mask: bool, check_empty: bool = True
) -> list[str]:
    """Plain-text lines about what does not add up between the answer and its masks (``check_empty=False``: the
    masks are targets through a volume, whose absence the legend states)."""
    notes = []
    seg_count = content.count(SEG_TOKEN)
    if expects_mask and not masks:
        reason = "the answer has no [SEG] token" if seg_count == 0 else f"the answer has {seg_count} [SEG] token(s)"
        notes.append(f"No mask came back for this segmentation request ({reason}).")
    elif seg_count != len(masks) and (seg_count or masks):
        notes.append(
            f"The answer marks {seg_count} target(s) with [SEG] but the server returned {len(masks)} mask(s): "
            "read the count in the answer with care."
        )
    for position, item in enumerate(masks if check_empty else ()):
        if not item.mask.any():
            notes.append(f"Mask {position + 1} ({item.label or 'mask'}) is empty: the model found no pixel for it.")
    return notes


def notes_html(notes: Sequence[str]) -> str:
    """The lines of :func:`answer_notes` as HTML paragraphs."""
    return "".join(f'<p class="answer-note" style="font-weight: 600">⚠ {html.escape(line)}</p>' for line in notes)
