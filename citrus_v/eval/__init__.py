"""``citrus-v eval``: one evaluator for every task Citrus-V reports (seg, det, vqa, report, doc, cot)."""
