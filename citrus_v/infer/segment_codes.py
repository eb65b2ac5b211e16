"""SNOMED CT codes for a segment, read from the words of its label ("the left kidney", "lesion 2", "liver cyst").

A label that names a finding (lesion, tumour, nodule, cyst, …) is a *Morphologically Abnormal Structure* of
that type, with the organ it names, if any, as its anatomic region; a label that names only an organ is an
*Anatomical Structure* of that type. "left", "right" and "both"/"bilateral" become a laterality modifier (of
the organ segment, or of a finding's region). A label that names nothing known gets the generic *Tissue* /
*Tissue* pair (3D Slicer's default terminology entry) and ``matched`` False.

Codes come from pydicom's SNOMED CT dictionary (``pydicom.sr.codedict.codes.SCT``), loaded on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# findings: word -> SCT attribute (all Morphologically Abnormal Structure)
_FINDINGS: dict[str, str] = {
    "lesion": "Lesion",
    "tumor": "Neoplasm", "tumour": "Neoplasm", "neoplasm": "Neoplasm", "cancer": "Neoplasm",
    "mass": "Mass", "masses": "Mass",
    "nodule": "Nodule",
    "cyst": "Cyst",
    "metastasis": "Metastasis", "metastases": "Metastasis", "metastatic": "Metastasis",
    "carcinoma": "Carcinoma",
    "hemorrhage": "Hemorrhage", "haemorrhage": "Hemorrhage", "bleed": "Hemorrhage", "bleeding": "Hemorrhage",
    "hematoma": "Hematoma", "haematoma": "Hematoma",
    "edema": "Edema", "oedema": "Edema",
    "effusion": "Effusion",
    "abscess": "Abscess", "abscesses": "Abscess",
    "thrombus": "Thrombus", "clot": "Thrombus",
    "aneurysm": "Aneurysm",
    "ulcer": "Ulcer",
    "necrosis": "Necrosis",
}

# organs and structures: words (several for a phrase) -> SCT attribute (all Anatomical Structure)
_ANATOMY: dict[str, str] = {
    "adrenal gland": "AdrenalGland", "adrenal": "AdrenalGland",
    "small intestine": "SmallIntestine", "small bowel": "SmallIntestine",
    "large intestine": "LargeIntestine", "large bowel": "LargeIntestine",
    "spinal cord": "SpinalCord", "lymph node": "LymphNode",
    "inferior vena cava": "InferiorVenaCava", "portal vein": "PortalVein",
    "urinary bladder": "Bladder", "gall bladder": "Gallbladder",
    "liver": "Liver", "hepatic": "Liver",
    "kidney": "Kidney", "renal": "Kidney",
    "spleen": "Spleen", "splenic": "Spleen",
    "heart": "Heart", "cardiac": "Heart",
    "lung": "Lung", "pulmonary": "Lung",
    "brain": "Brain", "cerebral": "Brain", "cerebellum": "Cerebellum",
    "bone": "Bone", "spine": "Spine", "vertebra": "Vertebra", "vertebrae": "Vertebra", "rib": "Rib",
    "femur": "Femur", "skull": "Skull",
    "aorta": "Aorta", "artery": "Artery", "vein": "Vein", "muscle": "Muscle",
    "pancreas": "Pancreas", "stomach": "Stomach", "gallbladder": "Gallbladder", "bladder": "Bladder",
    "prostate": "Prostate", "colon": "Colon", "duodenum": "Duodenum", "rectum": "Rectum",
    "esophagus": "Esophagus", "oesophagus": "Esophagus", "thyroid": "Thyroid", "trachea": "Trachea",
    "uterus": "Uterus", "ovary": "Ovary", "breast": "Breast", "pleura": "Pleura", "diaphragm": "Diaphragm",
    "eye": "Eye", "retina": "Retina", "skin": "Skin",
    "organ": "Organ",
}

_LATERALITY: dict[str, str] = {"right": "Right", "left": "Left", "bilateral": "Bilateral", "both": "Bilateral"}

_LONGEST_PHRASE = max(len(phrase.split()) for phrase in _ANATOMY)


@dataclass(frozen=True)
class SegmentCode:
    """How one segment is coded (``pydicom.sr.coding.Code`` values)."""

    category: Any  # Segmented Property Category
    type: Any  # Segmented Property Type
    type_modifier: Any | None = None  # laterality of an organ segment
    region: Any | None = None  # the organ a finding lies in (Anatomic Region)
    region_modifier: Any | None = None  # laterality of that organ
    matched: bool = True  # False: the label named nothing known, the generic pair is used


def segment_code(label: str | None) -> SegmentCode:
    """The codes for a segment labelled ``label`` (``None`` or unknown words: the generic pair)."""
    return _code_for_words(tuple(_words(label or "")))


@lru_cache(maxsize=256)
def _code_for_words(words: tuple[str, ...]) -> SegmentCode:
    from pydicom.sr.codedict import codes

    sct = codes.SCT
    finding = next((_FINDINGS[w] for w in words if w in _FINDINGS), None)
    organ = _first_anatomy(words)
    side = next((_LATERALITY[w] for w in words if w in _LATERALITY), None)
    laterality = None if side is None or organ is None else getattr(sct, side)
    if finding is not None:
        return SegmentCode(
            category=sct.MorphologicallyAbnormalStructure,
            type=getattr(sct, finding),
            region=None if organ is None else getattr(sct, organ),
            region_modifier=laterality,
        )
    if organ is not None:
        return SegmentCode(category=sct.AnatomicalStructure, type=getattr(sct, organ), type_modifier=laterality)
    return SegmentCode(category=sct.Tissue, type=sct.Tissue, matched=False)


def _first_anatomy(words: tuple[str, ...]) -> str | None:
    """The first organ the words name, preferring the longest phrase at each position ("spinal cord")."""
    for start in range(len(words)):
        for length in range(min(_LONGEST_PHRASE, len(words) - start), 0, -1):
            phrase = " ".join(words[start : start + length])
            if phrase in _ANATOMY:
                return _ANATOMY[phrase]
    return None


def _words(label: str) -> list[str]:
    """Lower-case words, plurals brought to the singular the tables use ("lungs", "kidneys", "nodules")."""
    words = re.findall(r"[a-z]+", label.lower())
    known = _FINDINGS.keys() | _LATERALITY.keys() | {w for phrase in _ANATOMY for w in phrase.split()}
    return [w[:-1] if w not in known and w.endswith("s") and w[:-1] in known else w for w in words]
