"""The prompts sent to the model, stored with every run's results.

Rows in Citrus-V format (the synthetic corpus, sets converted with ``citrus-v data convert``) are asked
their own user turn as written. Public sets read in their published layout get these templates:

- ``det``: upstream's detection prompt, ``Locate the {}, output its bbox coordinates using JSON format.``
- ``seg``: the dataset's own question (MeCoVQA-G and MedSegBench ship theirs).
- ``vqa``: the question as written (VQA-RAD, SLAKE, PathVQA).
- ``vqa-mc``: the question, then the lettered options one per line, then the instruction
  ``Answer with the option's letter from the given choices directly.`` (PMC-VQA; MedXpertQA-MM questions
  already list their choices, so only the instruction is appended).
- ``report``: ``Write a radiology report for this image.`` (the instruction of the report rows this project
  trains on).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..processing.boxes import DETECTION_PROMPT

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REPORT_PROMPT = "Write a radiology report for this image."

TEMPLATES: dict[str, str] = {
    "det": DETECTION_PROMPT,
    "seg": "{question}",
    "vqa": "{question}",
    "vqa-mc": "{question}\n{options}\n" + MC_INSTRUCTION,
    "vqa-mc-inline": "{question}\n" + MC_INSTRUCTION,
    "report": REPORT_PROMPT,
    "row": "the row's own user turn",
}


def options_block(options: Mapping[str, str]) -> str:
    """``A. text`` lines, one per option, in letter order."""
    return "\n".join(f"{key}. {value}" for key, value in sorted(options.items()))


def multiple_choice(question: str, options: Mapping[str, str], inline: bool = False) -> str:
    """The ``vqa-mc`` prompt (``inline``: the question already lists the choices)."""
    if inline:
        return TEMPLATES["vqa-mc-inline"].format(question=question.strip())
    return TEMPLATES["vqa-mc"].format(question=question.strip(), options=options_block(options))
