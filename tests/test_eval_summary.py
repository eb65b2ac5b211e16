"""Per-group corpus metrics (CIDEr with the whole set's document frequencies) and the sample-size warnings."""

from __future__ import annotations

import pytest

from citrus_v.eval import text_metrics
from citrus_v.eval.backends import ModelOutput
from citrus_v.eval.report import write_report
from citrus_v.eval.samples import EvalSample
from citrus_v.eval.scoring import score
from citrus_v.eval.summary import SMALL_SPLIT_SAMPLES, sample_size_warnings, summarize

REPORTS = [
    ("CT", "A 12 mm hypodense lesion in the right liver lobe.", "Hypodense lesion of 12 mm in the right lobe."),
    ("CT", "No focal liver lesion. Normal spleen.", "No focal lesion in the liver. The spleen is normal."),
    ("CT", "Two lesions in the left kidney.", "Two renal lesions on the left."),
    ("MR", "T2 hyperintense lesion in the left frontal lobe.", "Hyperintense lesion, left frontal lobe, on T2."),
]


def _records() -> list[dict]:
    records = []
    for k, (modality, reference, answer) in enumerate(REPORTS):
        sample = EvalSample(id=f"r{k}", task="report", prompt="<image>Write the findings.", images=["x.png"],
                            reference=reference, source=f"test:{k}", groups={"modality": modality})
        records.append(score(sample, ModelOutput(answer)))
    return records


def test_group_cider_uses_the_whole_sets_document_frequencies():
    records = _records()
    summary = summarize(records, ["report"])["report"]
    hyps = [r["parsed"]["tokens"] for r in records]
    refs = [[r["reference"]["tokens"]] for r in records]
    overall, per_sample = text_metrics.cider_d(hyps, refs)
    assert summary["overall"]["cider"] == pytest.approx(overall) and overall > 0
    groups = summary["groups"]["modality"]
    # the one-report MR group: with its own IDF every n-gram is in every document (log 1/1 = 0) and it scored 0
    assert text_metrics.cider_d(hyps[3:], refs[3:])[0] == 0.0
    assert groups["MR"]["cider"] == pytest.approx(per_sample[3]) and groups["MR"]["cider"] > 0
    assert groups["CT"]["cider"] == pytest.approx(sum(per_sample[:3]) / 3)
    # so the groups average back to the overall number, weighted by their sizes
    weighted = (3 * groups["CT"]["cider"] + groups["MR"]["cider"]) / 4
    assert weighted == pytest.approx(summary["overall"]["cider"])
    # BLEU is a corpus statistic of the group's own sentences: unchanged
    assert groups["MR"]["bleu1"] == pytest.approx(text_metrics.corpus_bleu(hyps[3:], refs[3:])[0])


def test_warnings_for_small_splits_and_tasks_without_samples(tmp_path):
    tasks = summarize(_records(), ["report", "vqa"])
    warnings = sample_size_warnings(tasks)
    assert len(warnings) == 2
    assert warnings[0].startswith(f"report: only 4 sample(s), under {SMALL_SPLIT_SAMPLES}: one answer moves")
    assert warnings[1].startswith("vqa: no samples of this task in the data")
    assert "(--limit 4)" in sample_size_warnings(tasks, limit=4)[0]
    big = summarize(_records() * 8, ["report"])  # 32 samples: no warning
    assert sample_size_warnings(big) == []
    report = write_report(tmp_path, {"warnings": warnings, "backend": {}}, tasks, None).read_text()
    assert "## Warnings" in report and f"- **Warning:** {warnings[0]}" in report
    assert report.index("## Warnings") < report.index("## Report generation")
