"""Absent-target rows: "not present" is an answer.

Asked to segment or detect something the image, volume or clip does not show, the answer says so in words and
holds no ``[SEG]`` and no box. Three kinds (``meta.absent_kind``):

* ``lesion_free``: a scan without a lesion, asked for "the lesion";
* ``outside_field_of_view``: an organ the scan's region does not include (a chest scan asked for the liver);
* ``modality_cannot_show``: a finding the modality cannot image (bone marrow edema on CT, a pulmonary embolism
  on a plain radiograph), with the modality that would show it.

Every such row carries ``meta.absent: true``, ``meta.target`` (what was asked for), ``meta.absent_kind`` and
``meta.asked`` (``segmentation`` or ``detection``), so that evaluation can count false masks and boxes.
:class:`AbsentBalance` decides how many extra rows a scene gets so that absent rows make up a chosen share of
the grounded (segmentation and detection) rows, counting the lesion-free rows a corpus writes anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..processing.boxes import DETECTION_PROMPT

ABSENT_KINDS = ("lesion_free", "outside_field_of_view", "modality_cannot_show")
# Row tasks that ask for a mask or a box: the share of absent rows is counted among these.
GROUNDED_TASKS = ("segmentation", "detection", "segmentation-3d")
# The most extra absent rows one scene gets (the rest is carried to the next scenes of the split).
MAX_PER_SCENE = 2

# Organs a scan of each region does not show (the phantoms' organs of the other regions).
OUTSIDE_VIEW: dict[str, tuple[str, ...]] = {
    "abdomen": ("right lung", "left lung", "heart"),
    "chest": ("liver", "spleen", "right kidney", "left kidney"),
    "heart": ("liver", "spleen", "left kidney"),
}
# Findings each modality cannot show: (name, the name in a sentence, the examination that would show it).
UNSEEN: dict[str, tuple[tuple[str, str, str], ...]] = {
    "CT": (("bone marrow edema", "bone marrow edema", "an MRI"),
           ("diffusion restriction", "diffusion restriction", "a diffusion-weighted MRI")),
    "MR": (("calcification", "calcification", "a CT"), ("kidney stone", "a kidney stone", "a CT")),
    "X-ray": (("pulmonary embolism", "a pulmonary embolism", "a CT angiogram"),
              ("aortic dissection", "an aortic dissection", "a CT angiogram")),
    "US": (("pulmonary nodule", "a pulmonary nodule", "a chest CT"),
           ("coronary calcification", "coronary calcification", "a cardiac CT")),
}
# How often each kind is drawn, when the scene allows it (the lesion-free question matters most: a normal scan).
KIND_WEIGHTS = {"lesion_free": 0.5, "outside_field_of_view": 0.3, "modality_cannot_show": 0.2}
MODALITY_WORDS = {"CT": "CT", "MR": "MRI", "X-ray": "radiograph", "US": "ultrasound"}

SEGMENT_QUESTIONS = ("Segment the {target}.", "Please segment the {target} in this {medium}.",
                     "Can you segment the {target}?")
ANSWERS: dict[str, tuple[str, ...]] = {
    "lesion_free": (
        "There is no {target} in this {medium}.",
        "No {target} is seen in this {medium}.",
        "I find no {target} in this {medium}, so there is nothing to mark.",
    ),
    "outside_field_of_view": (
        "The {target} is not in this {medium}: it shows the {region}.",
        "This {modality} of the {region} does not include the {target}.",
        "The {target} lies outside the field of view of this {region} {medium}.",
    ),
    "modality_cannot_show": (
        "{Phrase} cannot be seen on {modality_article}; {better} would show it.",
        "This {modality} cannot show {phrase}; {better} would be needed.",
    ),
}


@dataclass(frozen=True)
class AbsentScene:
    """What one scene (an image, a volume or a clip) allows to ask about that it does not show.

    ``medium`` is ``image``, ``volume`` or ``clip``; ``has_lesion`` whether a lesion is visible in it;
    ``can_detect`` whether detection questions may be asked (2-D images only).
    """

    modality: str
    region: str
    medium: str
    has_lesion: bool
    can_detect: bool = False

    def kinds(self) -> list[str]:
        """The absent kinds this scene can be asked about."""
        kinds = [] if self.has_lesion else ["lesion_free"]
        if OUTSIDE_VIEW.get(self.region):
            kinds.append("outside_field_of_view")
        if UNSEEN.get(self.modality):
            kinds.append("modality_cannot_show")
        return kinds


@dataclass(frozen=True)
class AbsentQuestion:
    """One absent-target question and its answer, with the row's ``meta`` additions."""

    question: str
    answer: str
    meta: dict[str, Any]


def absent_meta(target: str, kind: str, asked: str) -> dict[str, Any]:
    """The ``meta`` keys of an absent-target row."""
    if kind not in ABSENT_KINDS:
        raise ValueError(f"absent kind {kind!r}; choose from {ABSENT_KINDS}")
    return {"absent": True, "target": target, "absent_kind": kind, "asked": asked}


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(0, len(items)))]


def draw_question(scene: AbsentScene, rng: np.random.Generator) -> AbsentQuestion:
    """A random absent-target question the scene allows, with a varied answer in words."""
    kinds = scene.kinds()
    if not kinds:
        raise ValueError(f"a {scene.modality} {scene.medium} of the {scene.region} allows no absent-target question")
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    phrase, better = "", ""
    if kind == "lesion_free":
        target = "lesion"
    elif kind == "outside_field_of_view":
        target = _pick(rng, OUTSIDE_VIEW[scene.region])
    else:
        target, phrase, better = _pick(rng, UNSEEN[scene.modality])
    asked = "detection" if scene.can_detect and rng.uniform() < 0.5 else "segmentation"
    modality = MODALITY_WORDS.get(scene.modality, scene.modality)
    words = {"target": target, "phrase": phrase, "Phrase": phrase[:1].upper() + phrase[1:], "medium": scene.medium,
             "region": scene.region, "modality": modality, "modality_article": _with_article(modality),
             "better": better}
    if asked == "detection":
        question = DETECTION_PROMPT.format(target)
    else:
        question = _pick(rng, SEGMENT_QUESTIONS).format(**words)
    answer = _pick(rng, ANSWERS[kind]).format(**words)
    return AbsentQuestion(question, answer, absent_meta(target, kind, asked))


def _with_article(word: str) -> str:
    if word in ("CT", "MRI"):
        return f"{'an' if word == 'MRI' else 'a'} {word}"
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class AbsentBalance:
    """How many extra absent rows each scene gets, so that absent rows are ``share`` of the grounded rows.

    Kept per ``key`` (a split, and 2-D apart from 3-D) as a running balance in the order scenes are written,
    so the share holds in every split and the rows of earlier scenes never depend on later ones. Absent rows a
    scene already has (a lesion-free scan asked for "the lesion") count towards the share; when those alone
    are more than ``share``, no extra rows are added (the share is then a floor).
    """

    share: float
    owed: dict[Any, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"the absent share must be at least 0 and below 1, got {self.share}")

    def extra(self, key: Any, rows: Sequence[Mapping[str, Any]]) -> int:
        """Extra absent rows for a scene whose rows so far are ``rows``."""
        present = sum(1 for r in rows if r.get("task") in GROUNDED_TASKS and not is_absent(r))
        absent = sum(1 for r in rows if is_absent(r))
        # the scene's own absent rows are paid after its extra rows are decided, so that lesion-free scenes get
        # extra questions too; over many scenes the share is the same
        owed = self.owed.get(key, 0.0) + self.share / (1.0 - self.share) * present
        count = min(MAX_PER_SCENE, max(0, int(np.floor(owed + 1e-9))))
        self.owed[key] = owed - count - absent
        return count


def is_absent(row: Mapping[str, Any]) -> bool:
    """Whether a row is an absent-target row (``meta.absent`` true)."""
    meta = row.get("meta")
    return isinstance(meta, Mapping) and meta.get("absent") is True


def absent_rows(
    scene: AbsentScene,
    count: int,
    rng: np.random.Generator,
    make_row: Callable[[AbsentQuestion], dict[str, Any]],
    asked: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``count`` absent-target rows of one scene; ``make_row`` turns a question into the scene's row (its
    media, task and ``meta``). A question the scene already has (``asked``, or drawn before) is drawn again
    (a few tries)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set(asked)
    for _ in range(count):
        for _attempt in range(4):
            drawn = draw_question(scene, rng)
            if drawn.question not in seen:
                break
        seen.add(drawn.question)
        rows.append(make_row(drawn))
    return rows
