"""The answer extractor for closed questions and chain-of-thought answers.

1. **Answer span**: the text inside the first ``<answer>…</answer>`` (an unclosed ``<answer>`` runs to
   the end); else, when the text has ``</think>``, what follows it; else the whole text.
2. **Normalisation** (:func:`normalize`): Unicode NFKC, lower case, whitespace collapsed, a leading
   "answer:", "final answer:", "the answer is" removed, surrounding quotes, brackets and punctuation
   removed, the articles "a", "an", "the" dropped, number words zero–twenty written as digits.
3. **Multiple choice** (the question has lettered options): the option letter, found as the whole answer
   (``B``, ``(B)``, ``B.``), as the answer's start followed by ``.``, ``)`` or ``:`` (``B. Pneumonia``), or
   after "answer is" / "answer:" / "option" / "choice" when upper case, bracketed or standing alone
   (``The answer is (B)``, ``answer: b.``);
   else the option whose normalised text equals the normalised answer; else the one option whose text
   appears in the answer as whole words (when exactly one does). Correct when the letter equals the reference letter.
4. **Yes/no** (the reference is "yes" or "no"): the answer's first word when it is yes or no, else the
   one of the two that appears as a word (when exactly one does). Correct when it equals the reference.
5. **Other closed answers** ("left", "3", "CT"): the normalised answer; correct when it equals the
   normalised reference.

An answer from which nothing can be extracted (no option found, neither yes nor no, empty) is
*unparsable*: scored wrong and counted, never dropped.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_THINK_END = re.compile(r"</think>", re.I)
_LEAD = re.compile(r"^(?:(?:the\s+)?(?:final\s+|correct\s+)?answer(?:\s+is)?\s*[:：]?\s*)", re.I)
_STRIP = string.punctuation + " \t\n\"'`“”‘’«»（）【】。，：；！？"
_ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_WORD = re.compile(r"[^\W_]+")
_LETTER_ALONE = re.compile(r"^\(?([a-z])\)?[.:)]?$")
_LETTER_START = re.compile(r"^\(?([a-z])(?:\)|[.:])(?:\s|$)")
# "answer is B" / "option (b)" / "answer: b.": upper case, bracketed or alone ("the answer is a lesion" is no choice)
_LETTER_PHRASE = re.compile(r"(?:answer\s+is|answer\s*[:：]|option|choice)\s*(\()?([A-Za-z])(?(1)\)|\b)", re.I)
_FORMAT = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.S | re.I)


def answer_span(text: str) -> str:
    """Step 1: the ``<answer>`` part, else the text after ``</think>``, else the whole text (stripped)."""
    match = _ANSWER.search(text)
    if match:
        return match.group(1).strip()
    parts = _THINK_END.split(text)
    return parts[-1].strip() if len(parts) > 1 else text.strip()


def tagged_answer(text: str) -> str | None:
    """The text inside ``<answer>…</answer>`` (unclosed: to the end), or ``None`` without the tag."""
    match = _ANSWER.search(text)
    return match.group(1).strip() if match else None


def follows_cot_format(text: str) -> bool:
    """Whether the whole output is ``<think>…</think><answer>…</answer>`` with both parts non-empty."""
    match = _FORMAT.match(text)
    return bool(match and match.group(1).strip() and match.group(2).strip())


def normalize(text: str) -> str:
    """Step 2 of the extractor (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = " ".join(text.split())
    text = _LEAD.sub("", text).strip(_STRIP)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words).strip(_STRIP)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _contains_phrase(text_words: list[str], phrase_words: list[str]) -> bool:
    n = len(phrase_words)
    return n > 0 and any(text_words[i : i + n] == phrase_words for i in range(len(text_words) - n + 1))


@dataclass
class Extracted:
    """What the extractor read from an answer: ``value`` (``None`` when unparsable) and whether it is right."""

    value: str | None
    correct: bool

    @property
    def parsable(self) -> bool:
        return self.value is not None


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """Step 3: the chosen option letter (upper case) or ``None``."""
    letters = {k.strip().lower(): k for k in options}
    raw = unicodedata.normalize("NFKC", answer).strip().lower()
    raw = " ".join(raw.split())
    for pattern in (_LETTER_ALONE, _LETTER_START):
        match = pattern.match(raw)
        if match and match.group(1) in letters:
            return letters[match.group(1)].upper()
    text = " ".join(unicodedata.normalize("NFKC", answer).split())
    for match in _LETTER_PHRASE.finditer(text):
        letter, rest = match.group(2), text[match.end() :].lstrip()
        alone = not rest or rest[0] in ".,;:!?"
        if (match.group(1) or letter.isupper() or alone) and letter.lower() in letters:
            return letters[letter.lower()].upper()
    norm = normalize(answer)
    texts = {k: normalize(v) for k, v in options.items()}
    for key, value in texts.items():
        if value and norm == value:
            return key.upper()
    words = _words(norm)
    found = [key for key, value in texts.items() if value and _contains_phrase(words, _words(value))]
    return found[0].upper() if len(found) == 1 else None


def extract_yes_no(answer: str) -> str | None:
    """Step 4: ``"yes"``, ``"no"`` or ``None``."""
    words = _words(normalize(answer))
    if words and words[0] in ("yes", "no"):
        return words[0]
    present = {w for w in words if w in ("yes", "no")}
    return present.pop() if len(present) == 1 else None


def score_closed(text: str, reference: str, options: Mapping[str, str] | None = None) -> Extracted:
    """Extract the answer from a model output and compare it with ``reference`` (steps 1–5)."""
    span = answer_span(text)
    if options:
        letter = extract_option(span, options)
        ref = reference.strip()
        ref_letter = ref.upper() if ref.upper() in {k.upper() for k in options} else extract_option(ref, options)
        return Extracted(letter, letter is not None and letter == ref_letter)
    ref = normalize(reference)
    if ref in ("yes", "no"):
        value = extract_yes_no(span)
        return Extracted(value, value == ref)
    value = normalize(span)
    return Extracted(value or None, bool(value) and value == ref)
