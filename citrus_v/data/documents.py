"""Rendered lab-report images with known values, for document-understanding rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..objectives.annotations import char_class

# test -> (unit, low, high, decimals): reference range and how values are printed
LAB_TESTS: dict[str, tuple[str, float, float, int]] = {
    "Hemoglobin": ("g/dL", 12.0, 17.5, 1),
    "WBC": ("10^9/L", 4.0, 11.0, 1),
    "Platelets": ("10^9/L", 150.0, 400.0, 0),
    "Glucose": ("mmol/L", 3.9, 6.1, 1),
    "Creatinine": ("umol/L", 60.0, 110.0, 0),
    "ALT": ("U/L", 7.0, 56.0, 0),
    "Sodium": ("mmol/L", 135.0, 145.0, 0),
    "CRP": ("mg/L", 0.0, 5.0, 1),
}


@dataclass
class LabResult:
    name: str
    value: float
    unit: str
    low: float
    high: float
    decimals: int

    @property
    def text(self) -> str:
        """The value as printed, with its unit (``13.2 g/dL``)."""
        return f"{self.value:.{self.decimals}f} {self.unit}"

    @property
    def flag(self) -> str:
        """``high``, ``low`` or ``normal`` against the reference range."""
        return "high" if self.value > self.high else "low" if self.value < self.low else "normal"


@dataclass
class LabReport:
    """A rendered report; ``char_map`` holds each printed character's class over its cell (0 elsewhere),
    an annotation for training-only objectives (:mod:`citrus_v.objectives.annotations`)."""

    patient_id: str
    date: str
    results: list[LabResult]
    image: Image.Image
    char_map: np.ndarray


# the printed slip: LINE_COLUMNS characters per line, LINES lines, one character per cell
LINE_COLUMNS, LINES = 32, 8
NAME_COLUMN, VALUE_COLUMN, FLAG_COLUMN = 1, 12, 24


def make_lab_report(rng: np.random.Generator, cell: int = 28, num_tests: int = 5) -> LabReport:
    """Render a lab report (patient id, date, ``num_tests`` results with flags) as a printed slip.

    The slip is a fixed-pitch print: every character sits centred in its own ``cell``-pixel square, on a
    grid of ``LINE_COLUMNS x LINES`` cells (``32 * cell`` by ``8 * cell`` pixels). With ``cell`` equal to
    one merged image token (patch 14 x merge 2 = 28 px, the default) each token shows exactly one
    character, so the text map names it completely and the copy-attention targets
    (:mod:`citrus_v.processing.copy_targets`) can point each answer character at its token.
    """
    if cell < 8:
        raise ValueError(f"cell must be at least 8 pixels to print legibly, got {cell}")
    names = list(LAB_TESTS)
    chosen = [names[i] for i in sorted(rng.choice(len(names), size=min(num_tests, len(names)), replace=False))]
    if len(chosen) > LINES - 2:
        raise ValueError(f"a slip holds at most {LINES - 2} results, got num_tests={num_tests}")
    results = []
    for name in chosen:
        unit, low, high, decimals = LAB_TESTS[name]
        span = high - low
        value = round(float(rng.uniform(low - 0.3 * span, high + 0.3 * span)), decimals)
        results.append(LabResult(name, max(value, 0.0), unit, low, high, decimals))
    patient_id = f"P-{int(rng.integers(1000, 9999))}"
    date = f"2024-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    width, height = LINE_COLUMNS * cell, LINES * cell
    font = ImageFont.load_default(size=round(0.85 * cell))
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    char_map = np.zeros((height, width), dtype=np.uint8)
    _, top, _, bottom = font.getbbox("Hg")

    def write(column: int, line: int, text: str, fill: int = 0) -> None:
        if column + len(text) > LINE_COLUMNS:
            raise ValueError(f"{text!r} at column {column} does not fit a {LINE_COLUMNS}-column line")
        y = line * cell + (cell - (bottom - top)) // 2 - top
        for k, char in enumerate(text):
            x = (column + k) * cell
            draw.text((x + (cell - font.getlength(char)) / 2, y), char, fill=fill, font=font)
            char_map[line * cell : (line + 1) * cell, x : x + cell] = char_class(char)

    write(NAME_COLUMN, 0, "LABORATORY REPORT")
    write(NAME_COLUMN, 1, f"Patient {patient_id} Date {date}", 30)
    draw.line((cell // 2, 2 * cell, width - cell // 2, 2 * cell), fill=90, width=1)
    for line, result in enumerate(results, start=2):
        write(NAME_COLUMN, line, result.name)
        write(VALUE_COLUMN, line, result.text)
        write(FLAG_COLUMN, line, {"high": "H", "low": "L", "normal": ""}[result.flag])
    return LabReport(patient_id, date, results, image.convert("RGB"), char_map)
