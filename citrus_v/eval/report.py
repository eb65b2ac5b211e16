"""Writing a run's results: ``metrics.json``, ``report.md`` (a table per task) and ``seg_dice.png``.

The tables print fractions as percentages (×100, CIDEr too, as papers print it) and HD95 in mm; counts of
unparsable and failed samples stand next to every task's numbers. Warnings (a task without samples, or with too
few for its numbers to mean much) stand at the top. ``seg3d`` and ``absent`` also get a table of the issue's
quality bars (each figure, its bar, met or not).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import absent_metrics, seg3d_metrics

FIGURE = "seg_dice.png"
TASK_TITLES = {
    "seg": "Segmentation",
    "det": "Detection",
    "vqa": "Visual question answering",
    "report": "Report generation",
    "doc": "Documents",
    "cot": "Chain-of-thought",
    "seg3d": "Volume and clip segmentation",
    "absent": "Absent targets",
}
# metric key -> column title; counts are printed as they are, the rest ×100 unless listed in RAW
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "seg": [("n", "n"), ("dice", "Dice"), ("iou", "IoU"), ("hd95_mm", "HD95 (mm)"), ("n_hd95", "n HD95"),
            ("empty_answers", "empty mask for a lesion")],
    "det": [("n_single", "n single"), ("acc_iou50", "Acc@IoU≥0.5"), ("mean_iou", "mean IoU"), ("n_multi", "n multi"),
            ("ap50", "AP50"), ("ap50_95", "AP50:95")],
    "vqa": [("n_closed", "n closed"), ("closed_accuracy", "closed acc."), ("n_open", "n open"),
            ("open_recall", "open recall"), ("open_f1", "open F1")],
    "report": [("n", "n"), ("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
               ("rouge_l", "ROUGE-L"), ("meteor", "METEOR"), ("cider", "CIDEr")],
    "doc": [("n_qa", "n QA"), ("cer", "CER"), ("anls", "ANLS"), ("n_extraction", "n extraction"),
            ("field_em", "field EM")],
    "cot": [("n", "n"), ("accuracy", "answer acc."), ("format_share", "format share")],
    "seg3d": [("n", "n"), ("dice", "3-D Dice"), ("dice_median", "median Dice"), ("hd95_mm_median", "median HD95 (mm)"),
              ("n_hd95", "n HD95"), ("volume_error_median", "median volume error"), ("n_volume", "n volume"),
              ("seg_emitted", "[SEG] emitted"), ("empty_answers", "empty mask for a target")],
    "absent": [("n", "n"), ("false_mask_rate", "false-mask rate"), ("false_seg_rate", "[SEG] or mask"),
               ("false_box_rate", "box"), ("n_present", "n present (seg, seg3d)"),
               ("seg_emitted_present", "[SEG] emitted for present")],
}
COUNTS = {"n", "n_hd95", "empty_answers", "n_single", "n_multi", "n_closed", "n_open", "n_qa", "n_extraction",
          "n_volume", "n_present"}
RAW = {"hd95_mm", "hd95_mm_median"}
# the issue's quality bars printed under these tasks' tables
BARS = {"seg3d": seg3d_metrics.BARS, "absent": absent_metrics.BARS}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in COUNTS:
        return str(int(value))
    if key in RAW:
        return f"{float(value):.2f}"
    return f"{100 * float(value):.1f}"


def _table(task: str, rows: Sequence[tuple[str, dict[str, Any]]], first: str) -> list[str]:
    columns = COLUMNS[task]
    lines = ["| " + " | ".join([first] + [title for _, title in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label, metrics in rows:
        lines.append("| " + " | ".join([label] + [_cell(key, metrics.get(key)) for key, _ in columns]) + " |")
    return lines


def _bars(task: str, overall: dict[str, Any]) -> list[str]:
    """The quality-bar table of a task: each figure, its bar and whether it is met."""
    lines = ["| measure | value | bar | |", "|---|---|---|---|"]
    for key, title, direction, bar in BARS[task]:
        met = seg3d_metrics.bar_met(overall.get(key), direction, bar)
        verdict = "–" if met is None else ("met" if met else "not met")
        lines.append(f"| {title} | {_cell(key, overall.get(key))} | {direction.replace('>=', '≥').replace('<=', '≤')} "
                     f"{_cell(key, bar)} | {verdict} |")
    return lines


def write_metrics(out: Path, run: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> Path:
    """``metrics.json``: the run's settings and prompts, and every task's summary."""
    path = out / "metrics.json"
    path.write_text(json.dumps({"run": run, "tasks": tasks}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_figure(out: Path, seg_records: Sequence[dict[str, Any]], seg_summary: dict[str, Any]) -> Path | None:
    """``seg_dice.png``: mean Dice per modality (bars, with n) and the histogram of per-sample Dice."""
    scored = [r for r in seg_records if r["status"] != "failed"]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_modality = seg_summary.get("groups", {}).get("modality", {})
    names = sorted(by_modality)
    figure, (bars, histogram) = plt.subplots(1, 2, figsize=(11, 4))
    values = [100 * (by_modality[n]["dice"] or 0.0) for n in names]
    drawn = bars.bar(names, values, color="#d9822b")
    for rect, name in zip(drawn, names, strict=True):
        label = f"{rect.get_height():.1f}\nn={by_modality[name]['n']}"
        bars.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                      ha="center", va="bottom", fontsize=8)
    bars.set_ylim(0, 115)
    bars.set_ylabel("mean Dice (%)")
    bars.set_title("Dice per modality")
    bars.tick_params(axis="x", rotation=30)
    dice = [100 * float(r["scores"]["dice"]) for r in scored]
    histogram.hist(dice, bins=[10 * k for k in range(11)], color="#4c72b0", edgecolor="white")
    histogram.set_xlabel("Dice per sample (%)")
    histogram.set_ylabel("samples")
    histogram.yaxis.get_major_locator().set_params(integer=True)
    histogram.set_title(f"Dice histogram (n={len(dice)})")
    figure.tight_layout()
    path = out / FIGURE
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(out: Path, run: dict[str, Any], tasks: dict[str, dict[str, Any]], figure: Path | None) -> Path:
    """``report.md``: what was run, then per task the overall table, group tables and what went wrong."""
    backend = run.get("backend", {})
    source = backend.get("model") or f"{backend.get('api')} ({backend.get('served_model_name')})"
    lines = [
        "# Citrus-V evaluation",
        "",
        f"- model: {source} ({backend.get('backend')})",
        f"- data: {', '.join(run.get('data', []))} (split {run.get('split')})",
        f"- tasks: {', '.join(tasks)}; limit {run.get('limit')}, seed {run.get('seed')}; "
        "max new tokens " + ", ".join(f"{k} {v}" for k, v in (run.get("max_new_tokens") or {}).items()),
        "- numbers are percentages (CIDEr ×100 too), HD95 in mm; per-sample records: `predictions.jsonl`",
        "",
    ]
    warnings = run.get("warnings") or []
    if warnings:
        lines += ["## Warnings", ""] + [f"- **Warning:** {line}" for line in warnings] + [""]
    for task, summary in tasks.items():
        counts = summary["counts"]
        lines += [f"## {TASK_TITLES[task]} (`{task}`)", ""]
        if not counts["samples"]:
            lines += ["No samples of this task in the data.", ""]
            continue
        lines.append(
            f"{counts['samples']} samples: {counts['scored']} scored, {counts['unparsable']} unparsable "
            f"(scored as wrong), {counts['failed']} failed (not scored)."
        )
        lines.append("")
        lines += _table(task, [("all", summary["overall"])], "set")
        lines.append("")
        if task in BARS:
            lines += _bars(task, summary["overall"]) + [""]
        for key, values in summary["groups"].items():
            if len(values) < 2 and (task, key) not in (("seg", "modality"), ("seg3d", "target")):
                continue
            lines += [f"By {key}:", ""]
            lines += _table(task, sorted(values.items()), key)
            lines.append("")
        if task == "seg" and figure is not None:
            lines += [f"![Dice per modality and histogram]({figure.name})", ""]
        if summary["failed"]:
            lines += ["Failed samples:", ""]
            lines += [f"- `{item['id']}`: {item['error']}" for item in summary["failed"][:50]]
            if len(summary["failed"]) > 50:
                lines.append(f"- … and {len(summary['failed']) - 50} more (see predictions.jsonl)")
            lines.append("")
    prompts = run.get("prompts", {})
    if prompts:
        lines += ["## Prompts", ""]
        lines += [f"- `{name}`: {json.dumps(text, ensure_ascii=False)}" for name, text in prompts.items()]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
