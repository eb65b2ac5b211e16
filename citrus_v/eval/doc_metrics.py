"""Document metrics: character error rate, ANLS, and field-level exact match for key/value extraction.

- **CER** = Levenshtein distance (insertions, deletions, substitutions, each cost 1) between the answer and
  the reference, divided by the reference length in characters, after Unicode NFKC and collapsing runs of
  whitespace to one space (case kept). Reported per sample and for the whole set as Σ edits / Σ reference
  characters (the headline number); it can exceed 1.
- **ANLS** (DocVQA): s = 1 − NL when NL < 0.5, else 0, with NL = Levenshtein(a, r) / max(|a|, |r|) on
  lower-cased, whitespace-collapsed strings; the maximum over the reference answers; the mean over samples.
- **Field exact match**: the reference is a JSON object of fields; the answer's JSON object is read from a
  ```json fence, else from the outermost ``{…}``. Keys and values are compared after NFKC, lower case,
  whitespace collapsed (values that are not strings are written as JSON). Per sample: matched reference
  fields / reference fields; for the set: Σ matched / Σ fields. An answer without a JSON object is
  unparsable: no field matches, and it is counted.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings (unit costs), one numpy row per character of ``a``."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    target = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    positions = np.arange(len(b) + 1)
    row = positions.copy()
    for i, char in enumerate(a, start=1):
        code = ord(char)
        # substitution and deletion from the previous row; insertion by a running minimum along the row:
        # row[j] = min_k<=j (candidate[k] + j - k)
        candidate = np.empty_like(row)
        candidate[0] = i
        candidate[1:] = np.minimum(row[:-1] + (target != code), row[1:] + 1)
        row = np.minimum.accumulate(candidate - positions) + positions
    return int(row[-1])


def _collapse(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def cer_counts(prediction: str, reference: str) -> tuple[int, int]:
    """``(edits, reference characters)`` of the CER definition."""
    pred, ref = _collapse(prediction), _collapse(reference)
    return levenshtein(pred, ref), len(ref)


def cer(prediction: str, reference: str) -> float:
    """Character error rate of one answer (0 for two empty strings; edits when the reference is empty)."""
    edits, length = cer_counts(prediction, reference)
    return edits / length if length else float(edits)


def anls(prediction: str, references: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one answer against its reference answer(s)."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = _collapse(prediction).lower()
    best = 0.0
    for reference in refs:
        ref = _collapse(reference).lower()
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object an answer holds (a ```json fence first, else the outermost braces), or ``None``."""
    candidates = _FENCE.findall(text)
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _field_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return _collapse(text).lower()


def field_matches(prediction: dict[str, Any] | None, reference: dict[str, Any]) -> int:
    """How many reference fields the prediction gives exactly (normalised keys and values)."""
    if not prediction:
        return 0
    given = {_field_text(k): _field_text(v) for k, v in prediction.items()}
    return sum(1 for key, value in reference.items() if given.get(_field_text(key)) == _field_text(value))
