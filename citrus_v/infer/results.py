"""What a prediction returns: text, reasoning parts, boxes and masks in original-image pixels, and for a volume
or clip one mask stack per ``[SEG]`` on its frames.

numpy only: the web app and the server's response code read these types without torch or the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..media.boxes import Box  # one box type for parsing, prediction, serving and the app
from ..media.volume import Volume
from ..tokens import SEG_TOKEN

if TYPE_CHECKING:
    from .volume_measures import VolumeMeasures

_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


@dataclass
class MaskResult:
    """One mask per ``[SEG]``: a boolean ``[H, W]`` array of the original image size.

    ``low_res`` is the same mask thresholded at SAM 2's low resolution (``[h, w]``, 256x256 for SAM 2 Hiera),
    before any resize: what upstream Citrus-V's server encodes as ``raw_response.seg_masks_rle``. None where
    the mask did not come from the predictor (e.g. one read back from a server's JSON).
    """

    mask: np.ndarray
    score: float
    label: str | None = None
    index: int = 0  # which [SEG] of the answer (0-based)
    low_res: np.ndarray | None = None

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """Tight ``(x1, y1, x2, y2)`` box of the mask, ``None`` when empty."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class VolumeMask:
    """One ``[SEG]``'s mask through a volume or clip: a boolean ``[N, H, W]`` stack on the frames of ``volume``
    (frame ``k`` a mask of ``volume.values[k]``, in display orientation), the frames SAM 2 segmented.

    ``object_scores`` ``[N]`` are SAM 2's object-score logits per frame (> 0: the target is on that frame; a
    frame with a negative score gets no mask). ``present`` is False when no frame's score is positive: SAM 2
    finds the target nowhere, and the mask is empty — whatever the answer's words say (they are the language
    model's, and left as they are). ``key_frame`` indexes ``mask``: the frame with the highest score, where
    ``mode="memory"`` prompts SAM 2 before its memory carries the mask through the other frames
    (``"per_frame"``: the prompt on every frame on its own).
    """

    mask: np.ndarray
    object_scores: np.ndarray
    key_frame: int
    mode: str
    present: bool
    label: str | None = None
    index: int = 0  # which [SEG] of the answer (0-based)
    volume: Volume | None = field(default=None, repr=False)

    @property
    def source_frames(self) -> list[int]:
        """The source frame (0-based, in the source's order) each frame of ``mask`` is."""
        known = None if self.volume is None else self.volume.source_frames
        return list(range(self.mask.shape[0])) if known is None else [int(k) for k in known]

    @property
    def frames(self) -> list[int]:
        """The source frames that hold mask."""
        numbers = self.source_frames
        return [numbers[k] for k in np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))]

    @property
    def score(self) -> float:
        """The highest object score over the frames (> 0: present)."""
        return float(self.object_scores.max()) if self.object_scores.size else float("-inf")

    def measures(self) -> VolumeMeasures:
        """Volume in mL, per-frame areas and 3-D box over ``volume`` (see :mod:`~citrus_v.infer.volume_measures`)."""
        from .volume_measures import measure_stack

        if self.volume is None:
            raise ValueError("this mask carries no volume: its voxel spacing is unknown, so it cannot be measured")
        return measure_stack(self.volume, self.mask, self.index, self.label)


@dataclass
class Prediction:
    """The answer to one request."""

    text: str
    boxes: list[Box] = field(default_factory=list)
    masks: list[MaskResult] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) of the first image
    num_seg_tokens: int = 0

    @property
    def think(self) -> str | None:
        """The ``<think>`` part, when the answer has one."""
        match = _THINK.search(self.text)
        return match.group(1).strip() if match else None

    @property
    def answer(self) -> str:
        """The ``<answer>`` part when present, else the whole text."""
        match = _ANSWER.search(self.text)
        return match.group(1).strip() if match else self.text.strip()


_CLAUSE_SPLIT = re.compile(r"[,;:.\n]")
_LEADING = re.compile(r"^(?:sure|and|it is|it's|here is|here are|the|a|an|is|are)\b\s*", re.I)


def seg_labels(text: str, seg_token: str) -> list[str | None]:
    """The phrase each ``[SEG]`` stands for: the words just before it in its clause ("lesion [SEG]")."""
    labels: list[str | None] = []
    parts = text.split(seg_token)
    for before in parts[:-1]:
        clause = _CLAUSE_SPLIT.split(before)[-1].strip()
        previous = clause
        while previous:
            stripped = _LEADING.sub("", previous).strip()
            if stripped == previous:
                break
            previous = stripped
        labels.append(previous or None)
    return labels


def cut_at_stop(prediction: Prediction, stops: Sequence[str]) -> tuple[Prediction, bool]:
    """Cut the text at the first stop string and drop the masks of ``[SEG]`` tokens past the cut; whether it
    was cut. The one stop-string cut of the predictor and the server."""
    cut = min((prediction.text.find(s) for s in stops if s and s in prediction.text), default=-1)
    if cut < 0:
        return prediction, False
    text = prediction.text[:cut]
    kept = text.count(SEG_TOKEN)
    return replace(prediction, text=text, masks=prediction.masks[:kept], num_seg_tokens=kept), True
