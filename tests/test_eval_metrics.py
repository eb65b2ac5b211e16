"""Each metric against an independent reference: a library that computes it, or a hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from citrus_v.eval import det_metrics, doc_metrics, seg_metrics, text_metrics

# --- segmentation --------------------------------------------------------------------------------------------


def test_dice_and_iou_by_hand():
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True  # 4 pixels
    gt = np.zeros((4, 4), bool)
    gt[1:3, 0:3] = True  # 6 pixels; overlap row 1, cols 0-1: 2 pixels
    assert seg_metrics.dice(pred, gt) == pytest.approx(2 * 2 / (4 + 6))
    assert seg_metrics.iou(pred, gt) == pytest.approx(2 / 8)


def test_empty_masks():
    empty, lesion = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    lesion[2, 2] = True
    assert seg_metrics.dice(empty, empty) == 1.0 and seg_metrics.iou(empty, empty) == 1.0
    assert seg_metrics.dice(empty, lesion) == 0.0 and seg_metrics.iou(empty, lesion) == 0.0
    assert seg_metrics.dice(lesion, empty) == 0.0
    assert seg_metrics.hd95(empty, empty) == 0.0
    assert seg_metrics.hd95(empty, lesion) is None and seg_metrics.hd95(lesion, empty) is None


def test_masks_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        seg_metrics.dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_hd95_single_pixels_with_anisotropic_spacing():
    a, b = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    a[1, 0] = True
    b[4, 4] = True  # 3 rows and 4 columns apart
    assert seg_metrics.hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(3 * 2.0, 4 * 0.5))
    assert seg_metrics.hd95(a, b) == pytest.approx(5.0)


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    height, width = mask.shape
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask), strict=True):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            if not (0 <= ny < height and 0 <= nx < width) or not mask[ny, nx]:
                out[y, x] = True
    return out


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> float:
    pa = np.argwhere(_brute_surface(a)) * np.array(spacing)
    pb = np.argwhere(_brute_surface(b)) * np.array(spacing)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_a_brute_force_computation(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :48]
    a = (yy - rng.uniform(10, 30)) ** 2 + (xx - rng.uniform(10, 30)) ** 2 < rng.uniform(20, 120)
    b = (yy - rng.uniform(10, 30)) ** 2 / 2 + (xx - rng.uniform(15, 35)) ** 2 < rng.uniform(20, 150)
    b[0:3, 0:5] = True  # a second component touching the border
    spacing = (float(rng.uniform(0.3, 2)), float(rng.uniform(0.3, 2)))
    assert seg_metrics.hd95(a, b, spacing) == pytest.approx(_brute_hd95(a, b, spacing))


# --- detection -----------------------------------------------------------------------------------------------


def test_box_iou_by_hand():
    assert det_metrics.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert det_metrics.first_box_iou([], [0, 0, 1, 1]) == 0.0
    assert det_metrics.first_box_iou([[0, 0, 10, 10], [100, 100, 110, 110]], [0, 0, 10, 10]) == 1.0


def test_coco_ap_hand_computed_cases():
    gt = [[10, 10, 30, 30], [50, 50, 80, 90]]
    # everything found: AP 1 at every threshold
    assert det_metrics.coco_ap([(gt, gt, (100, 100))]) == {"AP50": pytest.approx(1.0), "AP50:95": pytest.approx(1.0)}
    # a false positive ranked first, then both boxes exactly: precision 1/2 at recall 1/2, 2/3 at recall 1;
    # interpolated precision is 2/3 at every recall level
    ranked = [[200, 200, 220, 220]] + gt
    result = det_metrics.coco_ap([(ranked, gt, (300, 300))])
    assert result["AP50"] == pytest.approx(2 / 3, abs=1e-6) and result["AP50:95"] == pytest.approx(2 / 3, abs=1e-6)
    # the first box at IoU 2/3 (x shifted by 4 of 20 px: 16*20 / (800 - 320)), the second exact. At thresholds
    # 0.50-0.65 both match: AP 1. At 0.70-0.95 the first (ranked first) is a false positive and the second a true
    # one: precision 1/2 at recall 1/2, so interpolated precision is 1/2 up to recall 0.5 (51 of the 101 points)
    shifted = [[14, 10, 34, 30], gt[1]]
    result = det_metrics.coco_ap([(shifted, gt, (100, 100))])
    assert det_metrics.box_iou(shifted[0], gt[0]) == pytest.approx(2 / 3)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP50:95"] == pytest.approx((4 * 1.0 + 6 * 0.5 * 51 / 101) / 10, abs=1e-6)


def test_coco_ap_without_predictions_or_ground_truth():
    assert det_metrics.coco_ap([([], [[0, 0, 5, 5], [6, 6, 9, 9]], (10, 10))]) == {"AP50": 0.0, "AP50:95": 0.0}
    assert det_metrics.coco_ap([]) == {"AP50": None, "AP50:95": None}


def test_coco_ap_matches_pycocotools_on_a_random_set():
    from contextlib import redirect_stdout
    from io import StringIO

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    items = []
    for _ in range(6):
        gt = [[x, y, x + w, y + h] for x, y, w, h in rng.uniform([0, 0, 10, 10], [60, 60, 40, 40], (3, 4)).tolist()]
        pred = [[v + rng.normal(0, 4) for v in box] for box in gt[: rng.integers(1, 4)]] + [[0, 0, 20, 20]]
        items.append((pred, gt, (120, 120)))
    ours = det_metrics.coco_ap(items)
    # the same data through pycocotools' own JSON route, written independently here
    images = [{"id": i + 1} for i in range(len(items))]
    anns, dets = [], []
    for i, (pred, gt, _) in enumerate(items):
        for box in gt:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                         "area": (box[2] - box[0]) * (box[3] - box[1])})
        for k, box in enumerate(pred):
            dets.append({"image_id": i + 1, "category_id": 7, "score": 1 / (k + 1),
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    with redirect_stdout(StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 7}]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert ours["AP50:95"] == pytest.approx(evaluator.stats[0])
    assert ours["AP50"] == pytest.approx(evaluator.stats[1])
    assert 0 < ours["AP50:95"] < ours["AP50"] <= 1


# --- report text ---------------------------------------------------------------------------------------------
HYPS = [
    "The heart is normal in size. No focal lesion in the left lung.",
    "A 12 mm nodule in the right lung, with a small nodule nearby.",
    "CT of the abdomen shows the liver and the spleen; no lesion.",
    "Impression: normal study of the chest.",
]
REFS = [
    "The heart is normal in size. There is no focal lesion in the lungs.",
    "A 14 mm nodule in the right lung. Impression: 1 lesion.",
    "CT of the abdomen. The liver and spleen are shown. No focal lesion.",
    "Impression: normal study.",
]


def test_tokenisation_is_written_down():
    assert text_metrics.tokenize("T2-hyperintense, 12.5 mm") == ["t2", "hyperintense", "12", "5", "mm"]
    assert text_metrics.tokenize("肝脏 lesion_A") == ["肝", "脏", "lesion", "a"]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_matches_sacrebleu(n):
    from sacrebleu.metrics import BLEU

    hyps = [text_metrics.tokenize(t) for t in HYPS]
    refs = [[text_metrics.tokenize(t)] for t in REFS]
    ours = text_metrics.corpus_bleu(hyps, refs)[n - 1]
    reference = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n).corpus_score(
        [" ".join(h) for h in hyps], [[" ".join(r[0]) for r in refs]]
    )
    assert ours == pytest.approx(reference.score / 100, abs=1e-9)
    assert 0 < ours < 1


def test_bleu_matches_the_coco_caption_toolkit_with_brevity_penalty():
    from pycocoevalcap.bleu.bleu import Bleu

    hyps = [text_metrics.tokenize(t) for t in HYPS]
    hyps[1] = hyps[1][:5]  # short hypotheses: the brevity penalty applies
    refs = [[text_metrics.tokenize(t)] for t in REFS]
    scores, _ = Bleu(4).compute_score(
        {i: [" ".join(r[0])] for i, r in enumerate(refs)}, {i: [" ".join(h)] for i, h in enumerate(hyps)}, verbose=0
    )
    assert text_metrics.corpus_bleu(hyps, refs) == pytest.approx(scores, abs=1e-6)


def test_bleu_edge_cases():
    assert text_metrics.corpus_bleu([[]], [[["a", "b"]]]) == [0.0] * 4
    assert text_metrics.corpus_bleu([["a", "b", "c", "d"]], [[["a", "b", "c", "d"]]]) == pytest.approx([1.0] * 4)
    # no bigram in common: BLEU-2..4 are 0, BLEU-1 is not
    assert text_metrics.corpus_bleu([["a", "x", "b"]], [[["a", "y", "b"]]])[1:] == [0.0, 0.0, 0.0]


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for hyp, ref in zip(HYPS, REFS, strict=True):
        expected = scorer.score(ref, hyp)["rougeL"].fmeasure
        ours = text_metrics.rouge_l(text_metrics.tokenize(hyp), text_metrics.tokenize(ref))
        assert ours == pytest.approx(expected, abs=1e-12)
    assert text_metrics.rouge_l([], ["a"]) == 0.0


def test_meteor_by_hand():
    same = "the liver shows a small lesion".split()
    # all 6 unigrams match in one chunk: Fmean 1, penalty 0.5 * (1/6)^3
    assert text_metrics.meteor(same, same) == pytest.approx(1 - 0.5 * (1 / 6) ** 3)
    # hypothesis "lesion liver" against "liver lesion": 2 matches in 2 chunks; P = R = 1, penalty 0.5 * 1^3
    assert text_metrics.meteor(["lesion", "liver"], ["liver", "lesion"]) == pytest.approx(0.5)
    # Porter stems match: "lesions" ~ "lesion"; 1 of 2 hypothesis words, 1 of 1 reference word, 1 chunk
    p, r = 1 / 2, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    assert text_metrics.meteor(["lesions", "seen"], ["lesion"]) == pytest.approx(fmean * (1 - 0.5 * 1.0**3))
    assert text_metrics.meteor([], ["a"]) == 0.0


def test_cider_matches_the_coco_caption_toolkit():
    from pycocoevalcap.cider.cider import Cider

    hyps = [text_metrics.tokenize(t) for t in HYPS]
    refs = [[text_metrics.tokenize(t), text_metrics.tokenize(t.replace("lesion", "finding"))] for t in REFS]
    expected, per_sample = Cider().compute_score(
        {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}, {i: [" ".join(h)] for i, h in enumerate(hyps)}
    )
    ours, ours_per_sample = text_metrics.cider_d(hyps, refs)
    assert ours == pytest.approx(expected, abs=1e-9)
    assert ours_per_sample == pytest.approx(list(per_sample), abs=1e-9)
    assert ours > 0


def test_open_question_token_recall_and_f1_by_hand():
    # reference tokens: left, kidney (article dropped); answer: the, left, renal, kidney, cyst
    recall, f1 = text_metrics.token_recall_f1("The left renal kidney cyst", "the left kidney")
    assert recall == 1.0 and f1 == pytest.approx(2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))
    assert text_metrics.token_recall_f1("liver", "left kidney") == (0.0, 0.0)
    assert text_metrics.token_recall_f1("", "") == (1.0, 1.0)


# --- documents -----------------------------------------------------------------------------------------------


def _dp_levenshtein(a: str, b: str) -> int:
    table = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, table[0] = table[0], i
        for j, cb in enumerate(b, 1):
            previous, table[j] = table[j], min(table[j] + 1, table[j - 1] + 1, previous + (ca != cb))
    return table[-1]


def test_levenshtein_and_cer_by_hand():
    assert doc_metrics.levenshtein("kitten", "sitting") == 3
    assert doc_metrics.cer("kitten", "sitting") == pytest.approx(3 / 7)
    assert doc_metrics.cer("13.2  g/dL", "13.2 g/dL") == 0.0  # whitespace runs collapse
    assert doc_metrics.cer("abc", "ABC") == 1.0  # case is kept
    assert doc_metrics.cer("", "") == 0.0 and doc_metrics.levenshtein("", "abc") == 3


def test_levenshtein_matches_the_textbook_recurrence():
    rng = np.random.default_rng(0)
    alphabet = list("abcé漢 ")
    for _ in range(200):
        a = "".join(rng.choice(alphabet, rng.integers(0, 12)))
        b = "".join(rng.choice(alphabet, rng.integers(0, 12)))
        assert doc_metrics.levenshtein(a, b) == _dp_levenshtein(a, b)


def test_anls_by_hand():
    assert doc_metrics.anls("Hello Word", "hello world") == pytest.approx(1 - 1 / 11)
    assert doc_metrics.anls("abc", "xyz") == 0.0  # NL = 1 >= 0.5
    assert doc_metrics.anls("abcd", "abxy") == 0.0  # NL = 0.5: not below the threshold
    assert doc_metrics.anls("P-1234", ["P-9999", "P-1234"]) == 1.0
    assert doc_metrics.anls("", "") == 1.0


def test_field_exact_match():
    reference = {"Hemoglobin": "13.2 g/dL", "WBC": "7.1 10^9/L", "CRP": "4.0 mg/L"}
    answer = '```json\n{"hemoglobin": "13.2  g/dL", "WBC": "7.2 10^9/L", "extra": "x"}\n```'
    given = doc_metrics.json_object(answer)
    assert doc_metrics.field_matches(given, reference) == 1
    assert doc_metrics.json_object("no json here") is None
    assert doc_metrics.field_matches(None, reference) == 0
    assert doc_metrics.json_object('Result: {"a": 1} done') == {"a": 1}


def test_every_pair_of_tiny_masks_obeys_dice_iou_relation():
    """Dice = 2 IoU / (1 + IoU) for every pair of 2x2 masks (an identity, not the implementation)."""
    masks = [np.array(bits, bool).reshape(2, 2) for bits in itertools.product([0, 1], repeat=4)]
    for a, b in itertools.product(masks, masks):
        i = seg_metrics.iou(a, b)
        assert seg_metrics.dice(a, b) == pytest.approx(2 * i / (1 + i))
