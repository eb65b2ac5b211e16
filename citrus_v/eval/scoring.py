"""Scoring one sample: a model output and the ground truth -> one ``predictions.jsonl`` record.

A record holds everything needed to trace and re-aggregate a number: the prompt, the raw output, what was
parsed from it, the reference, the per-sample scores and a status — ``ok``, ``unparsable`` (nothing could be
read from the answer: scored as wrong and counted) or ``failed`` (no answer: the backend gave up; counted,
listed and left out of the metrics).

Per task (metric definitions in the metric modules):

- ``seg``: the answer's masks (one per ``[SEG]``) are joined into one mask and compared with the union of the
  reference masks: Dice, IoU, and HD95 in mm when the pixel spacing is known. No mask is an empty mask.
- ``det``: the answer's boxes in original pixels. One reference box: IoU of the first box (0 without a box,
  ``unparsable``). Several: the boxes are kept for COCO AP over the set.
- ``vqa``: closed questions through the answer extractor (correct 0/1); open questions token recall and F1.
- ``report``: per-sample ROUGE-L and METEOR; the tokens are kept for corpus BLEU and CIDEr.
- ``doc``: extraction answers (a JSON object of fields) by field exact match; other answers CER and ANLS.
- ``cot``: the ``<answer>`` part through the answer extractor (no tag: ``unparsable``), and whether the
  output follows ``<think>…</think><answer>…</answer>``.
- ``seg3d``: the answer's mask stacks ``[N, H, W]`` (one per ``[SEG]``, on the video's grid) are joined and
  compared with the union of the 3-D references: Dice, HD95 in mm, volume error (:mod:`.seg3d_metrics`). A
  grounded answer with ``[SEG]`` but no stack, or a stack of another shape, fails the sample (the backend could
  not segment the volume), rather than scoring as an empty mask.
- ``absent``: whether the answer drew anything (a ``[SEG]``, a non-empty mask, a box) for a target that is not
  there (:mod:`.absent_metrics`); the answer's words are kept.
"""

from __future__ import annotations

from typing import Any

from ..media import mask_to_rle
from ..tokens import SEG_TOKEN
from . import absent_metrics, answers, det_metrics, doc_metrics, seg3d_metrics, seg_metrics, text_metrics
from .backends import ModelOutput
from .references import first_image_size, pixel_spacing, reference_masks
from .samples import EvalSample
from .volume_references import reference_stacks


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def base_record(sample: EvalSample) -> dict[str, Any]:
    """The fields every record has, before scoring."""
    record: dict[str, Any] = {
        "id": sample.id,
        "task": sample.task,
        "source": sample.source,
        "groups": dict(sample.groups),
        "template": sample.template,
        "system": sample.system,
        "prompt": sample.prompt,
        "images": [str(i) if not isinstance(i, dict) else "<inline>" for i in sample.images],
    }
    if sample.videos:
        record["videos"] = [str(v) if not isinstance(v, dict) else "<inline>" for v in sample.videos]
    return record


def failed_record(sample: EvalSample, error: BaseException) -> dict[str, Any]:
    """The record of a sample the backend could not answer."""
    record = base_record(sample)
    record.update(status="failed", error=f"{type(error).__name__}: {error}", output=None, parsed=None, scores={})
    return record


def score(sample: EvalSample, output: ModelOutput) -> dict[str, Any]:
    """Score one answer; the record's ``scores`` are this sample's numbers."""
    record = base_record(sample)
    record.update(status="ok", error=None, output=output.text, grounded=output.grounded)
    scorer = {"seg": _seg, "det": _det, "vqa": _vqa, "report": _report, "doc": _doc, "cot": _cot, "seg3d": _seg3d,
              "absent": _absent}[sample.task]
    scorer(sample, output, record)
    return record


def _seg(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    width, height = first_image_size(sample)
    truth = seg_metrics.union_mask(reference_masks(sample, (width, height)), (height, width))
    for k, mask in enumerate(output.masks):
        if mask.shape != (height, width):
            raise ValueError(f"predicted mask {k} is {mask.shape[::-1]} (WxH), the image {width}x{height}")
    predicted = seg_metrics.union_mask(output.masks, (height, width))
    spacing = pixel_spacing(sample)
    distance = seg_metrics.hd95(predicted, truth, spacing) if spacing else None
    record["parsed"] = {"num_masks": len(output.masks), "area": int(predicted.sum()),
                        "mask": mask_to_rle(predicted) if predicted.any() else None}
    record["reference"] = {"num_masks": len(sample.reference or []), "area": int(truth.sum())}
    record["spacing"] = list(spacing) if spacing else None
    record["scores"] = {
        "dice": _round(seg_metrics.dice(predicted, truth)),
        "iou": _round(seg_metrics.iou(predicted, truth)),
        "hd95": _round(distance) if spacing else None,
        "hd95_defined": bool(spacing) and distance is not None,
    }


def _seg3d(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    truth_stacks = reference_stacks(sample)
    shape = truth_stacks.shape
    seg_tokens = output.text.count(SEG_TOKEN)
    if output.grounded and seg_tokens and not output.masks:
        raise ValueError(f"the answer has {seg_tokens} [SEG] but the backend returned no mask stack: it gives no "
                         "masks for a volume or clip")
    for k, mask in enumerate(output.masks):
        if tuple(mask.shape) != shape:
            raise ValueError(f"predicted mask {k} is {tuple(mask.shape)}, the video's grid (frames, rows, columns) "
                             f"is {shape}: give one [N, H, W] stack per [SEG] on every frame")
    truth = seg_metrics.union_mask(truth_stacks.masks, shape)
    predicted = seg_metrics.union_mask(output.masks, shape)
    scores = seg3d_metrics.score_stacks(predicted, truth, truth_stacks.spacing, truth_stacks.kind == "clip")
    record["parsed"] = {"num_masks": len(output.masks), "seg_tokens": seg_tokens, "voxels": int(predicted.sum()),
                        "frames": int(predicted.any(axis=(1, 2)).sum()), "volume_ml": _round(scores.predicted_ml)}
    record["reference"] = {"num_masks": len(sample.reference or []), "voxels": int(truth.sum()),
                           "frames": int(truth.any(axis=(1, 2)).sum()), "volume_ml": _round(scores.reference_ml),
                           "shape": list(shape), "kind": truth_stacks.kind}
    record["spacing"] = None if truth_stacks.spacing is None else list(truth_stacks.spacing)
    record["scores"] = {
        "dice": _round(scores.dice),
        "hd95": _round(scores.hd95_mm),
        "hd95_defined": scores.hd95_defined,
        "volume_error": _round(scores.volume_error),
        "seg_emitted": float(seg_tokens > 0 or bool(output.masks)),
    }


def _absent(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    given = absent_metrics.grounding_given(output.text, output.masks, output.boxes)
    record["parsed"] = given["parsed"]
    record["reference"] = dict(sample.reference or {}, absent=True)
    record["scores"] = given["scores"]


def _det(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    width, height = first_image_size(sample)
    reference = [[float(v) for v in box] for box in sample.reference]
    record["parsed"] = {"boxes": [[_round(v, 3) for v in box] for box in output.boxes]}
    record["reference"] = {"boxes": reference, "image_size": [width, height]}
    if not output.boxes:
        record["status"] = "unparsable"
    if len(reference) == 1:
        value = det_metrics.first_box_iou(output.boxes, reference[0])
        record["scores"] = {"iou": _round(value), "hit50": float(value >= 0.5)}
    else:
        record["scores"] = {"num_pred": len(output.boxes), "num_gt": len(reference)}


def _vqa(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    record["reference"] = {"answer": sample.reference, "answer_type": sample.answer_type, "options": sample.options}
    if sample.answer_type == "closed":
        extracted = answers.score_closed(output.text, sample.reference, sample.options)
        record["parsed"] = {"answer": extracted.value}
        record["scores"] = {"correct": float(extracted.correct)}
        if not extracted.parsable:
            record["status"] = "unparsable"
        return
    span = answers.answer_span(output.text)
    recall, f1 = text_metrics.token_recall_f1(span, sample.reference)
    record["parsed"] = {"answer": span}
    record["scores"] = {"recall": _round(recall), "f1": _round(f1)}
    if not span:
        record["status"] = "unparsable"


def _report(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    span = answers.answer_span(output.text)
    hyp, ref = text_metrics.tokenize(span), text_metrics.tokenize(sample.reference)
    record["parsed"] = {"report": span, "tokens": hyp}
    record["reference"] = {"report": sample.reference, "tokens": ref}
    record["scores"] = {
        "rouge_l": _round(text_metrics.rouge_l(hyp, ref)),
        "meteor": _round(text_metrics.meteor(hyp, ref)),
    }
    if not hyp:
        record["status"] = "unparsable"


def _doc(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    span = answers.answer_span(output.text)
    record["reference"] = {"answer": sample.reference, "answer_type": sample.answer_type}
    if sample.answer_type == "extraction":
        truth = doc_metrics.json_object(sample.reference) or {}
        given = doc_metrics.json_object(span)
        matched = doc_metrics.field_matches(given, truth)
        record["parsed"] = {"fields": given}
        record["scores"] = {"field_em": _round(matched / len(truth)) if truth else 0.0, "fields_matched": matched,
                            "fields_total": len(truth)}
        if given is None:
            record["status"] = "unparsable"
        return
    edits, length = doc_metrics.cer_counts(span, sample.reference)
    record["parsed"] = {"answer": span}
    record["scores"] = {"cer": _round(edits / length if length else float(edits)), "edits": edits, "chars": length,
                        "anls": _round(doc_metrics.anls(span, sample.reference))}


def _cot(sample: EvalSample, output: ModelOutput, record: dict) -> None:
    tagged = answers.tagged_answer(output.text)
    record["reference"] = {"answer": sample.reference, "options": sample.options}
    if tagged is None:
        record["parsed"] = {"answer": None}
        correct, parsable = False, False
    else:
        extracted = answers.score_closed(f"<answer>{tagged}</answer>", sample.reference, sample.options)
        record["parsed"] = {"answer": extracted.value}
        correct, parsable = extracted.correct, extracted.parsable
    record["scores"] = {"correct": float(correct), "format_ok": float(answers.follows_cot_format(output.text))}
    if not parsable:
        record["status"] = "unparsable"

