"""From ``predictions.jsonl`` records to the numbers of ``metrics.json``: per task, overall and per group.

Metrics are fractions (0–1; CIDEr on the COCO toolkit's 0–10 scale; HD95 in mm). Failed samples are left out
and counted; unparsable ones are in, scored as wrong. Groups are the samples' ``dataset``, ``modality``,
``region`` and ``answer_type`` (whichever the set has); each group gets the task's metrics on its samples,
except what needs the whole evaluated set: a group's CIDEr uses the set's document frequencies. ``seg3d`` and
``absent`` are also grouped by ``target`` (the target the question names) and ``absent_kind``.

:func:`sample_size_warnings` says when a task has no samples or too few for its numbers to mean much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import absent_metrics, det_metrics, seg3d_metrics, text_metrics

Record = dict[str, Any]
GROUP_KEYS = ("dataset", "modality", "region", "answer_type", "organ", "question_type", "target", "absent_kind")
# Below this many samples one answer moves an accuracy by more than 3 points, and the 95% interval of a
# proportion near one half is wider than ±18 points: the report warns that the numbers are rough.
SMALL_SPLIT_SAMPLES = 30


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _scores(records: Sequence[Record], key: str) -> list[float]:
    return [float(r["scores"][key]) for r in records if r["scores"].get(key) is not None]


def seg_metrics(records: Sequence[Record]) -> dict[str, Any]:
    """Mean Dice and IoU; mean HD95 (mm) where it is defined; answers with an empty mask where there is a lesion."""
    with_spacing = [r for r in records if r.get("spacing")]
    return {
        "n": len(records),
        "dice": _mean(_scores(records, "dice")),
        "iou": _mean(_scores(records, "iou")),
        "hd95_mm": _mean([float(r["scores"]["hd95"]) for r in with_spacing if r["scores"].get("hd95_defined")]),
        "n_hd95": sum(1 for r in with_spacing if r["scores"].get("hd95_defined")),
        "hd95_undefined": sum(1 for r in with_spacing if not r["scores"].get("hd95_defined")),
        "empty_answers": sum(1 for r in records if r["parsed"]["area"] == 0 and r["reference"]["area"] > 0),
    }


def det_metrics_of(records: Sequence[Record]) -> dict[str, Any]:
    """Acc@IoU≥0.5 and mean IoU on single-box questions; COCO AP50 and AP50:95 on multi-box ones."""
    single = [r for r in records if len(r["reference"]["boxes"]) == 1]
    multi = [r for r in records if len(r["reference"]["boxes"]) > 1]
    ap = det_metrics.coco_ap(
        [(r["parsed"]["boxes"], r["reference"]["boxes"], tuple(r["reference"]["image_size"])) for r in multi]
    )
    return {
        "n_single": len(single),
        "acc_iou50": _mean(_scores(single, "hit50")),
        "mean_iou": _mean(_scores(single, "iou")),
        "n_multi": len(multi),
        "ap50": ap["AP50"],
        "ap50_95": ap["AP50:95"],
    }


def seg3d_metrics_of(records: Sequence[Record]) -> dict[str, Any]:
    """Mean and median 3-D Dice; median HD95 (mm) where defined; median volume error; the [SEG]-emitted rate."""
    dice = _scores(records, "dice")
    hd95 = [float(r["scores"]["hd95"]) for r in records if r["scores"].get("hd95_defined")]
    errors = _scores(records, "volume_error")
    present = [r for r in records if r["reference"]["num_masks"] > 0]
    return {
        "n": len(records),
        "dice": _mean(dice),
        "dice_median": seg3d_metrics.median(dice),
        "hd95_mm_median": seg3d_metrics.median(hd95),
        "n_hd95": len(hd95),
        "hd95_undefined": sum(1 for r in records if r.get("spacing") and r["reference"].get("kind") == "volume"
                              and not r["scores"].get("hd95_defined")),
        "volume_error_median": seg3d_metrics.median(errors),
        "volume_error_mean": _mean(errors),
        "n_volume": len(errors),
        "seg_emitted": _mean(_scores(present, "seg_emitted")),
        "empty_answers": sum(1 for r in records if r["parsed"]["voxels"] == 0 and r["reference"]["voxels"] > 0),
    }


def vqa_metrics(records: Sequence[Record]) -> dict[str, Any]:
    """Closed-question accuracy; open-question token recall and F1."""
    closed = [r for r in records if r["reference"]["answer_type"] == "closed"]
    opened = [r for r in records if r["reference"]["answer_type"] != "closed"]
    return {
        "n_closed": len(closed),
        "closed_accuracy": _mean(_scores(closed, "correct")),
        "n_open": len(opened),
        "open_recall": _mean(_scores(opened, "recall")),
        "open_f1": _mean(_scores(opened, "f1")),
    }


def report_metrics(records: Sequence[Record], corpus: Sequence[Record] | None = None) -> dict[str, Any]:
    """Corpus BLEU-1..4 and CIDEr-D; mean ROUGE-L and METEOR.

    ``corpus``: the whole evaluated set when ``records`` is one group of it. CIDEr's IDF is a property of the
    reference corpus: recomputed on a group of a few reports, an n-gram found in all of them weighs nothing (a
    one-report group scores 0 whatever the answer), so a group is scored with the whole set's document
    frequencies, and the groups' CIDEr then average to the overall one. BLEU needs no corpus statistics.
    """
    hyps = [r["parsed"]["tokens"] for r in records]
    refs = [[r["reference"]["tokens"]] for r in records]
    bleu = text_metrics.corpus_bleu(hyps, refs) if records else [None] * 4
    idf_corpus = text_metrics.cider_document_frequency([[r["reference"]["tokens"]] for r in corpus or records])
    cider = text_metrics.cider_d(hyps, refs, corpus=idf_corpus)[0] if records else None
    out: dict[str, Any] = {"n": len(records)}
    out.update({f"bleu{n + 1}": bleu[n] for n in range(4)})
    out.update(rouge_l=_mean(_scores(records, "rouge_l")), meteor=_mean(_scores(records, "meteor")), cider=cider)
    return out


def doc_metrics_of(records: Sequence[Record]) -> dict[str, Any]:
    """CER (Σ edits / Σ characters) and ANLS on answers; field exact match on extractions."""
    qa = [r for r in records if r["reference"]["answer_type"] != "extraction"]
    extraction = [r for r in records if r["reference"]["answer_type"] == "extraction"]
    chars = sum(r["scores"]["chars"] for r in qa)
    fields = sum(r["scores"]["fields_total"] for r in extraction)
    return {
        "n_qa": len(qa),
        "cer": sum(r["scores"]["edits"] for r in qa) / chars if chars else None,
        "anls": _mean(_scores(qa, "anls")),
        "n_extraction": len(extraction),
        "field_em": sum(r["scores"]["fields_matched"] for r in extraction) / fields if fields else None,
        "field_em_per_sample": _mean(_scores(extraction, "field_em")),
    }


def cot_metrics(records: Sequence[Record]) -> dict[str, Any]:
    """Final-answer accuracy and the share of outputs in the ``<think>…</think><answer>…</answer>`` format."""
    return {
        "n": len(records),
        "accuracy": _mean(_scores(records, "correct")),
        "format_share": _mean(_scores(records, "format_ok")),
    }


TASK_METRICS: dict[str, Callable[..., dict[str, Any]]] = {
    "seg": seg_metrics,
    "det": det_metrics_of,
    "vqa": vqa_metrics,
    "report": report_metrics,
    "doc": doc_metrics_of,
    "cot": cot_metrics,
    "seg3d": seg3d_metrics_of,
    "absent": absent_metrics.absent_metrics,
}
# tasks whose metrics take the whole set (``corpus``) when scoring one group of it
CORPUS_METRICS = {"report"}


def summarize_task(task: str, records: Sequence[Record]) -> dict[str, Any]:
    """``{"counts", "overall", "groups", "failed", "unparsable"}`` of one task's records."""
    scored = [r for r in records if r["status"] != "failed"]
    metric = TASK_METRICS[task]
    extra = {"corpus": scored} if task in CORPUS_METRICS else {}
    groups: dict[str, dict[str, Any]] = {}
    for key in GROUP_KEYS:
        values = sorted({str(r["groups"][key]) for r in scored if key in r.get("groups", {})})
        if values:
            groups[key] = {
                value: metric([r for r in scored if str(r["groups"].get(key)) == value], **extra) for value in values
            }
    return {
        "counts": {
            "samples": len(records),
            "scored": len(scored),
            "unparsable": sum(1 for r in records if r["status"] == "unparsable"),
            "failed": sum(1 for r in records if r["status"] == "failed"),
        },
        "overall": metric(scored),
        "groups": groups,
        "failed": [{"id": r["id"], "error": r.get("error")} for r in records if r["status"] == "failed"],
        "unparsable": [r["id"] for r in records if r["status"] == "unparsable"],
    }


def summarize(records: Sequence[Record], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every requested task's summary (tasks without samples get zero counts and empty metrics).

    ``absent`` also gets, in ``overall``, the ``[SEG]``-emitted rate over the present targets of the run's
    ``seg`` and ``seg3d`` samples (``None`` when the run has none): the false-mask rate means little without it.
    """
    summaries = {task: summarize_task(task, [r for r in records if r["task"] == task]) for task in tasks}
    if "absent" in summaries:
        summaries["absent"]["overall"].update(absent_metrics.present_seg_rate(records))
    return summaries


def sample_size_warnings(tasks: dict[str, dict[str, Any]], limit: int | None = None) -> list[str]:
    """One line per requested task that has no samples, or fewer than :data:`SMALL_SPLIT_SAMPLES`."""
    lines = []
    for task, summary in tasks.items():
        count = summary["counts"]["samples"]
        if count == 0:
            lines.append(f"{task}: no samples of this task in the data; nothing was scored (check --data and --split)")
        elif count < SMALL_SPLIT_SAMPLES:
            cause = f" (--limit {limit})" if limit is not None and count >= limit else ""
            lines.append(
                f"{task}: only {count} sample(s){cause}, under {SMALL_SPLIT_SAMPLES}: one answer moves an accuracy "
                f"by {100 / count:.1f} points; treat these numbers as rough"
            )
    return lines
