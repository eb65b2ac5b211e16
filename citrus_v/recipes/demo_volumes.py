"""The demo's volumes and clips: their quality bars, the two ways a ``[SEG]`` meets a volume's frames side by side,
and pictures of held-out volumes and clips with the model's mask beside the truth.

The held-out volumes and clips are asked the same kinds of question as the training ones ("Segment the liver.",
"Segment every lesion.", organs outside the field of view, lesions the scan does not have); ``citrus-v eval`` scores
them as the ``seg3d`` task (3-D Dice, HD95 in mm, volume error) and the ``absent`` task (the false-mask rate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .bars import bar_rows, summary_value

VOLUME_TARGETS: dict[str, tuple[str, float]] = {
    "3-D mean Dice": (">=", 0.75),
    "median volume error": ("<=", 0.15),
    "false-mask rate, absent targets": ("<=", 0.05),
    "[SEG] emitted, present targets": (">=", 0.95),
    "multi-lesion det AP50": (">=", 0.50),
}


# reported beside the bars: the closed questions about volumes and clips (counting lesions through a volume, a
# lesion in an organ), scored in the 2-D evaluation's vqa task
VOLUME_CLOSED = "closed VQA accuracy, volumes and clips"


def volume_numbers(tasks: dict[str, Any]) -> dict[str, float | None]:
    """The numbers :data:`VOLUME_TARGETS` are about, from the eval summaries."""

    return {
        "3-D mean Dice": summary_value(tasks, "seg3d", "dice"),
        "median volume error": summary_value(tasks, "seg3d", "volume_error_median"),
        "false-mask rate, absent targets": summary_value(tasks, "absent", "false_mask_rate"),
        "[SEG] emitted, present targets": summary_value(tasks, "absent", "seg_emitted_present"),
        "multi-lesion det AP50": summary_value(tasks, "det", "ap50"),
    }


def propagation_row(tasks: dict[str, Any], mode: str) -> dict[str, Any]:
    """One line of the propagation comparison: the ``seg3d`` summary of an eval run in ``mode``."""
    seg3d = tasks.get("seg3d", {}).get("overall", {})
    keys = ("n", "dice", "dice_median", "volume_error_median", "hd95_mm_median")
    return {"mode": mode, **{key: seg3d.get(key) for key in keys}}


def volume_pictures(backend: Any, test: Path, out: Path, per_kind: int = 1) -> list[Path]:
    """For ``per_kind`` held-out volumes and clips with a target, the model's masks and the truth drawn on the
    volume's three planes (a clip: a strip of its frames), written to ``out``; returns the pictures."""
    from ..eval.backends import GenerationOptions
    from ..eval.loaders import LoadOptions, load_data
    from ..eval.volume_references import reference_stacks, video_header, video_ref
    from ..infer.volume_pictures import volume_picture
    from ..media import read_volume

    out.mkdir(parents=True, exist_ok=True)
    samples = [s for loaded in load_data([str(test)], LoadOptions("test")) for s in loaded.samples]
    written: list[Path] = []
    for kind in ("volume", "clip"):
        chosen = [s for s in samples if s.task == "seg3d" and video_header(s).kind == kind][:per_kind]
        for k, sample in enumerate(chosen):
            answer = backend.predict([sample], [[]], GenerationOptions(max_new_tokens=64))[0]
            truth = reference_stacks(sample)
            predicted = np.any(np.stack(answer.masks), axis=0) if answer.masks else np.zeros(truth.shape, bool)
            target = np.any(np.stack(truth.masks), axis=0) if truth.masks else np.zeros(truth.shape, bool)
            volume = read_volume(video_ref(sample))
            labels = [f"model: {answer.text.strip()[:60]}", f"truth: {sample.groups.get('target', 'target')}"]
            path = out / f"seg3d_{kind}_{k}.png"
            volume_picture(volume, [predicted, target], labels).save(path)
            written.append(path)
    return written


def write_propagation(rows: list[dict[str, Any]], out: Path) -> None:
    """The comparison as JSON next to the report."""
    out.write_text(json.dumps(rows, indent=2) + "\n")


def volume_section(
    numbers: dict[str, float | None], propagation: list[dict[str, Any]], pictures: list[Path], out: Path
) -> str:
    """The report's section on volumes and clips: their bars, the propagation comparison and the pictures."""
    if not propagation:
        return ""
    lines = ["", "## Volumes and clips (held-out)", "", "| measure | value | target | status |", "|---|---|---|---|"]
    lines += bar_rows(numbers, VOLUME_TARGETS)
    closed = numbers.get(VOLUME_CLOSED)
    if closed is not None:
        lines += ["", f"Closed questions about volumes and clips (no bar): accuracy {closed:.3f}."]
    lines += [
        "",
        "How each `[SEG]` met the frames (`memory`: SAM 2's memory from the most certain frame; `per_frame`: each "
        "frame prompted alone):",
        "",
        "| propagation | n | 3-D Dice | median Dice | median volume error | median HD95 (mm) |",
        "|---|---|---|---|---|---|",
    ]
    for row in propagation:
        cells = [_cell(row.get(key)) for key in ("n", "dice", "dice_median", "volume_error_median", "hd95_mm_median")]
        lines.append(f"| {row['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "Per target and per modality: `eval_volumes/report.md`.", ""]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in pictures]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)
