"""Rendered lab-report images with known values, for document-understanding rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..modeling.text_map import char_class

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
    """A rendered report; ``text_map`` holds each printed character's class over its glyph box (0 elsewhere),
    the target of the training-only text-map loss (:mod:`citrus_v.modeling.text_map`)."""

    patient_id: str
    date: str
    results: list[LabResult]
    image: Image.Image
    text_map: np.ndarray


def make_lab_report(rng: np.random.Generator, size: int = 224, num_tests: int = 5) -> LabReport:
    """Render a lab report (patient id, date, ``num_tests`` results with flags) as a ``size``-pixel image."""
    names = list(LAB_TESTS)
    chosen = [names[i] for i in sorted(rng.choice(len(names), size=min(num_tests, len(names)), replace=False))]
    results = []
    for name in chosen:
        unit, low, high, decimals = LAB_TESTS[name]
        span = high - low
        value = round(float(rng.uniform(low - 0.3 * span, high + 0.3 * span)), decimals)
        results.append(LabResult(name, max(value, 0.0), unit, low, high, decimals))
    patient_id = f"P-{int(rng.integers(1000, 9999))}"
    date = f"2024-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    scale = size / 224
    font = ImageFont.load_default(size=max(8, round(11 * scale)))
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    text_map = np.zeros((size, size), dtype=np.uint8)
    _, top, _, bottom = font.getbbox("Hg")

    def write(x: int, y: int, text: str, fill: int) -> None:
        draw.text((x, y), text, fill=fill, font=font)
        for k, char in enumerate(text):
            label = char_class(char)
            if label:
                left, right = round(x + font.getlength(text[:k])), round(x + font.getlength(text[: k + 1]))
                text_map[max(0, y + top) : min(size, y + bottom), max(0, left) : min(size, right)] = label

    line = round(15 * scale)
    x0, y = round(8 * scale), round(8 * scale)
    write(x0, y, "LABORATORY REPORT", 0)
    y += line
    write(x0, y, f"Patient: {patient_id}   Date: {date}", 30)
    y += line
    draw.line((x0, y, size - x0, y), fill=90, width=1)
    y += round(5 * scale)
    for result in results:
        mark = {"high": "H", "low": "L", "normal": ""}[result.flag]
        write(x0, y, result.name, 0)
        write(x0 + round(80 * scale), y, result.text, 0)
        write(size - x0 - round(14 * scale), y, mark, 0)
        y += line
    return LabReport(patient_id, date, results, image.convert("RGB"), text_map)
